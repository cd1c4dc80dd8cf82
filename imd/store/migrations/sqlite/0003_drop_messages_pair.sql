-- imd store schema v3 (SQLite): read receipts' last_sent_to reads the recipient's inbox instead of
-- an index of its own. messages_pair cost a random b-tree leaf per message: measured at 300,000
-- stored messages and 10,000 msgs/s, 31 % of the bytes written and 24 % of the CPU per message
-- (docs/store.md, session 7).
DROP INDEX IF EXISTS messages_pair;
