-- imd store schema v6 (PostgreSQL): read receipts' last_sent_to reads the recipient's inbound
-- entries (messages_inbound) within a window of Store.read_scan_max seqs, as the SQLite store
-- does (its migration 0003); the index messages_pair (an entry per message, ≈ 3 µs of the backend's
-- CPU per message, docs/store.md session 5) served nothing else.
DROP INDEX IF EXISTS messages_pair;
