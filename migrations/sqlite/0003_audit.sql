-- The append-only audit log. One row in audit_records per request (allowed or denied), inserted
-- in the request's own transaction without any lock. `record` is the canonical JSON of the audit
-- record (no PHI: agents, codes, outcome, the patient only as a compartment pseudonym, the query
-- only as a keyed hash). The sequencer then gives committed records dense sequence numbers in
-- audit_log (under the counter row's lock), with each record's RFC 9162 leaf hash bound to its
-- position: the Merkle tree over audit_log never changes behind a checkpoint, however many
-- server processes write.
CREATE TABLE audit_records (
    record_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT    NOT NULL,
    recorded_us   INTEGER NOT NULL,
    interaction   TEXT    NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    outcome       INTEGER NOT NULL,
    agent         TEXT,
    patient       TEXT,
    record        BLOB    NOT NULL
);
CREATE INDEX audit_records_by_patient ON audit_records (tenant, patient, recorded_us);
CREATE INDEX audit_records_by_agent ON audit_records (tenant, agent, recorded_us);
CREATE INDEX audit_records_by_time ON audit_records (tenant, recorded_us);

-- The log itself: records in sequence order, each bound to its position by its leaf hash.
CREATE TABLE audit_log (
    sequence      INTEGER PRIMARY KEY,
    record_id     INTEGER NOT NULL UNIQUE REFERENCES audit_records (record_id),
    leaf_hash     BLOB    NOT NULL
);

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
CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END;
