-- The CA's state, as SQLite's migration 1 (times are Unix seconds).
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE roots (id BIGINT PRIMARY KEY, state TEXT NOT NULL, not_after BIGINT NOT NULL);
CREATE TABLE issued (
    serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after BIGINT NOT NULL,
    kind TEXT NOT NULL, issued_at BIGINT NOT NULL);
-- The primary key is what makes a join token single use across replicas.
CREATE TABLE used_tokens (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL, used_at BIGINT NOT NULL);
