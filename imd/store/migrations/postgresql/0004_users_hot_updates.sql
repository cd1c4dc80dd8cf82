-- imd store schema v4 (PostgreSQL): every batch updates the users row of each user it touches (seq
-- reservation). With full pages the new row version goes to another page, which adds an entry to
-- every index of users and leaves the old one to vacuum (measured: 3 WAL records, 193 bytes per
-- user per batch). With room on the page the update is HOT (heap-only: no index entry) and the
-- next access prunes the dead version in place. 40 % leaves room for each row of a page to get a
-- new version within one statement. Applies to pages filled from now on (a VACUUM FULL of users
-- re-packs existing ones).
ALTER TABLE users SET (fillfactor = 40);
