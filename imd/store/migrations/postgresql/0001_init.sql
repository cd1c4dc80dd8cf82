-- imd store schema v1 (PostgreSQL). Applied once under an advisory lock; recorded in schema_version.
CREATE TABLE users (
    id          text PRIMARY KEY,
    role        text,
    platform    text,
    last_seen   bigint,               -- ms since epoch; NOT NULL once touched (a "known" user)
    last_seq    bigint NOT NULL DEFAULT 0,
    credentials text                  -- SCRAM keys, JSON
);
-- notices to a role / to all: only known users
CREATE INDEX users_known_role ON users (role, id) WHERE last_seen IS NOT NULL;

CREATE TABLE messages (
    mid           text PRIMARY KEY,
    kind          text NOT NULL,      -- 'msg' | 'notice'
    sender        text,               -- NULL for a notice
    recipient     text NOT NULL,
    body          text NOT NULL,      -- JSON (a string or an object), byte-exact
    ctx           text,               -- JSON object or NULL
    ts            bigint NOT NULL,
    client_id     text,
    sender_seq    bigint,
    recipient_seq bigint NOT NULL,
    notice_kind   text
);
-- dedupe by client id (NULL client ids never collide)
CREATE UNIQUE INDEX messages_client ON messages (sender, client_id);
-- read receipts: last_sent_to(sender, recipient, upto)
CREATE INDEX messages_pair ON messages (sender, recipient, recipient_seq);
-- retention
CREATE INDEX messages_ts ON messages USING brin (ts);   -- ts grows with insertion order

-- inbox reads (since/limit) and offline reads walk the primary key
CREATE TABLE inbox (
    user_id text NOT NULL,
    seq     bigint NOT NULL,
    mid     text NOT NULL,
    inbound boolean NOT NULL,         -- true: addressed to user_id; false: sent by user_id
    PRIMARY KEY (user_id, seq)
);

CREATE TABLE cursors (
    user_id text NOT NULL,
    device  text NOT NULL,
    seq     bigint NOT NULL,
    PRIMARY KEY (user_id, device)
);

CREATE TABLE contacts (
    user_id text NOT NULL,
    contact text NOT NULL,
    PRIMARY KEY (user_id, contact)
);
