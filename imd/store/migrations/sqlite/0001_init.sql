-- imd store schema v1 (SQLite). Applied once; recorded in schema_version.
CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    role        TEXT,
    platform    TEXT,
    last_seen   INTEGER,              -- ms since epoch; NOT NULL once touched (a "known" user)
    last_seq    INTEGER NOT NULL DEFAULT 0,
    credentials TEXT                  -- SCRAM keys, JSON
) WITHOUT ROWID;
CREATE INDEX users_role ON users (role) WHERE role IS NOT NULL;

CREATE TABLE messages (
    mid           TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,      -- 'msg' | 'notice'
    sender        TEXT,               -- NULL for a notice
    recipient     TEXT NOT NULL,
    body          TEXT NOT NULL,      -- JSON (a string or an object)
    ctx           TEXT,               -- JSON object or NULL
    ts            INTEGER NOT NULL,
    client_id     TEXT,
    sender_seq    INTEGER,
    recipient_seq INTEGER NOT NULL,
    notice_kind   TEXT,
    UNIQUE (sender, client_id)
);
CREATE INDEX messages_pair ON messages (sender, recipient, recipient_seq);
CREATE INDEX messages_ts ON messages (ts);

CREATE TABLE inbox (
    user    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    mid     TEXT NOT NULL,
    inbound INTEGER NOT NULL,         -- 1: addressed to user; 0: sent by user
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;

CREATE TABLE cursors (
    user   TEXT NOT NULL,
    device TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;

CREATE TABLE contacts (
    user    TEXT NOT NULL,
    contact TEXT NOT NULL,
    PRIMARY KEY (user, contact)
) WITHOUT ROWID;
