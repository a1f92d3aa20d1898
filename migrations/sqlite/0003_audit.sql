-- The append-only audit log. One row per request (allowed or denied). `record` is the canonical
-- JSON of the audit record (no PHI: agents, codes, outcome, the patient only as a compartment
-- pseudonym, the query only as a keyed hash); `leaf_hash` is its RFC 9162 leaf hash, bound to
-- the sequence number. Sequence numbers are dense: the counter row below hands them out inside
-- the writing transaction, so the Merkle tree over records in sequence order never changes
-- behind a checkpoint, however many server processes write.
CREATE TABLE audit_log (
    sequence      INTEGER PRIMARY KEY,
    tenant        TEXT    NOT NULL,
    recorded_us   INTEGER NOT NULL,
    interaction   TEXT    NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    outcome       INTEGER NOT NULL,
    agent         TEXT,
    patient       TEXT,
    record        BLOB    NOT NULL,
    leaf_hash     BLOB    NOT NULL
);
CREATE INDEX audit_log_by_patient ON audit_log (tenant, patient, recorded_us);
CREATE INDEX audit_log_by_agent ON audit_log (tenant, agent, recorded_us);
CREATE INDEX audit_log_by_time ON audit_log (tenant, recorded_us);

CREATE TABLE audit_counter (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    next_sequence INTEGER NOT NULL
);
INSERT INTO audit_counter (id, next_sequence) VALUES (1, 0);

-- Signed checkpoints: (tree size, root hash, time) signed with the audit Ed25519 key.
CREATE TABLE audit_checkpoints (
    tree_size   INTEGER PRIMARY KEY,
    root_hash   BLOB    NOT NULL,
    signed_us   INTEGER NOT NULL,
    key_id      TEXT    NOT NULL,
    signature   BLOB    NOT NULL
);

-- Append-only: nothing may change or remove an audit row or checkpoint.
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
