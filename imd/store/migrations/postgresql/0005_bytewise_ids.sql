-- imd store schema v5 (PostgreSQL): ids, mids and client ids compare bytewise (COLLATE "C").
-- Every message insert descends five b-trees keyed on these text columns, and with the
-- database's default collation (C.UTF-8 here, a libc locale) each comparison copied both
-- strings and went through strcoll; bytewise it is one memcmp. Measured (1,000-message
-- batches, one backend): about -5 % PostgreSQL CPU per message (docs/store.md, session 5).
-- Nothing orders ids for a user to see: user ids are ASCII (imd.store.base.USER_ID_RE), and
-- the users upsert only needs one consistent lock order, which this statement gives every
-- writer. The column types stay text (binary coercible: no table rewrite), but the indexes
-- on these columns are rebuilt, which locks the tables for writes while it runs (once, at
-- this upgrade).
ALTER TABLE messages ALTER COLUMN mid TYPE text COLLATE "C",
                     ALTER COLUMN sender TYPE text COLLATE "C",
                     ALTER COLUMN recipient TYPE text COLLATE "C",
                     ALTER COLUMN client_id TYPE text COLLATE "C";
ALTER TABLE users ALTER COLUMN id TYPE text COLLATE "C";
ALTER TABLE cursors ALTER COLUMN user_id TYPE text COLLATE "C";
ALTER TABLE contacts ALTER COLUMN user_id TYPE text COLLATE "C",
                     ALTER COLUMN contact TYPE text COLLATE "C";
