-- The append-only audit log (see migrations/sqlite/0003_audit.sql for the design notes).
CREATE TABLE audit_records (
    record_id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant        TEXT   NOT NULL,
    recorded_us   BIGINT NOT NULL,
    interaction   TEXT   NOT NULL,
    resource_type TEXT,
    resource_id   TEXT,
    outcome       BIGINT NOT NULL,
    agent         TEXT,
    patient       TEXT,
    record        BYTEA  NOT NULL
);
CREATE INDEX audit_records_by_patient ON audit_records (tenant, patient, recorded_us);
CREATE INDEX audit_records_by_agent ON audit_records (tenant, agent, recorded_us);
CREATE INDEX audit_records_by_time ON audit_records (tenant, recorded_us);

CREATE TABLE audit_log (
    sequence      BIGINT PRIMARY KEY,
    record_id     BIGINT NOT NULL UNIQUE REFERENCES audit_records (record_id),
    leaf_hash     BYTEA  NOT NULL
);

CREATE TABLE audit_counter (
    id            BIGINT PRIMARY KEY CHECK (id = 1),
    next_sequence BIGINT NOT NULL
);
INSERT INTO audit_counter (id, next_sequence) VALUES (1, 0);

CREATE TABLE audit_checkpoints (
    tree_size   BIGINT PRIMARY KEY,
    root_hash   BYTEA  NOT NULL,
    signed_us   BIGINT NOT NULL,
    key_id      TEXT   NOT NULL,
    signature   BYTEA  NOT NULL
);

-- Append-only, enforced by the database for every role, the owner included.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- The application role: everything it needs, and on the audit tables only INSERT and SELECT
-- (README: run the server as a login role that is a member of custodian_app). Roles are
-- cluster-wide, so it is created once and re-granted per database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'custodian_app') THEN
        CREATE ROLE custodian_app NOLOGIN;
    END IF;
END
$$;
GRANT SELECT, INSERT, UPDATE, DELETE ON resource_versions, resource_heads, patient_compartments, data_keys TO custodian_app;
GRANT SELECT, UPDATE ON audit_counter TO custodian_app;
GRANT SELECT, INSERT ON audit_records, audit_log, audit_checkpoints TO custodian_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO custodian_app;
