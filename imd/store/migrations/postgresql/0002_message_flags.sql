-- imd store schema v2 (PostgreSQL): what a message's sender asked of the recipient's client that the
-- core envelope has no field for, as bits (1: an XEP-0184 receipt request). Existing rows: 0
-- (a constant default: no table rewrite).
ALTER TABLE messages ADD COLUMN flags integer NOT NULL DEFAULT 0;
