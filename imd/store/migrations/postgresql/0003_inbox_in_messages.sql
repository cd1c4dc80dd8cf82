-- imd store schema v3 (PostgreSQL): the inbox is the messages table itself. User U's entry at seq S
-- is the message with (recipient, recipient_seq) = (U, S) — inbound — or (sender, sender_seq) =
-- (U, S) — outbound, the sender's own copy. The inbox table held exactly that again (user, seq,
-- mid, inbound), and every message cost two more heap rows for it; two unique indexes on messages
-- serve the same reads (and keep (user, seq) unique per direction). The writer always filled
-- inbox from those columns and purge deleted both together, so nothing is lost by dropping it.
-- Building the indexes locks messages for writes while they are built (once, at this upgrade).
CREATE UNIQUE INDEX messages_inbound ON messages (recipient, recipient_seq);
CREATE UNIQUE INDEX messages_outbound ON messages (sender, sender_seq);
DROP TABLE inbox;
