-- The schema every SQLite CA had before migrations were versioned. IF NOT
-- EXISTS: a CA made by an older moat already has these tables and is
-- recorded at version 1 without change.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roots (id INTEGER PRIMARY KEY, state TEXT NOT NULL, not_after INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after INTEGER NOT NULL,
    kind TEXT NOT NULL, issued_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS used_tokens (jti TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, used_at INTEGER NOT NULL);
