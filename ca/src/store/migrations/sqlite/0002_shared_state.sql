-- Root certificates move into the store (their keys stay files in the CA
-- directory), so that every replica serves the same bundle; rotation and
-- revocation state get version counters that replicas poll.
ALTER TABLE roots ADD COLUMN cert_pem TEXT;
CREATE TABLE versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
INSERT INTO versions (name, version) VALUES ('roots', 1), ('revocations', 0);
-- Revocations (the feature comes later): a certificate by serial, or every
-- certificate of an identity, until a time; `version` is the value of
-- versions.revocations that the revocation set.
CREATE TABLE revocations (
    id INTEGER PRIMARY KEY,
    serial TEXT,
    spiffe_id TEXT,
    reason TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    until INTEGER NOT NULL,
    version INTEGER NOT NULL,
    CHECK (serial IS NOT NULL OR spiffe_id IS NOT NULL));
CREATE INDEX revocations_version ON revocations (version);
CREATE INDEX issued_spiffe_id ON issued (spiffe_id);
CREATE INDEX used_tokens_expires_at ON used_tokens (expires_at);
