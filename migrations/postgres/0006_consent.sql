-- Consent enforcement and break-the-glass (see migrations/sqlite/0006_consent.sql for the notes).
CREATE INDEX resource_versions_consents ON resource_versions (tenant, compartment, resource_id)
    WHERE resource_type = 'Consent';

CREATE TABLE break_glass_sessions (
    tenant      TEXT   NOT NULL,
    session_id  TEXT   NOT NULL,
    token_hash  TEXT   NOT NULL,
    subject     TEXT   NOT NULL,
    fhir_user   TEXT,
    roles       TEXT   NOT NULL,
    opened_us   BIGINT NOT NULL,
    expires_us  BIGINT NOT NULL,
    reason      BYTEA  NOT NULL,
    PRIMARY KEY (tenant, session_id)
);
CREATE UNIQUE INDEX break_glass_sessions_by_token ON break_glass_sessions (tenant, token_hash);
CREATE INDEX break_glass_sessions_by_time ON break_glass_sessions (tenant, opened_us);

CREATE TABLE break_glass_reviews (
    tenant      TEXT   NOT NULL,
    session_id  TEXT   NOT NULL,
    reviewed_us BIGINT NOT NULL,
    reviewer    TEXT   NOT NULL,
    status      TEXT   NOT NULL CHECK (status IN ('justified', 'unjustified', 'needs-follow-up')),
    note        BYTEA,
    PRIMARY KEY (tenant, session_id, reviewed_us, reviewer)
);

CREATE TRIGGER break_glass_sessions_append_only BEFORE UPDATE OR DELETE ON break_glass_sessions
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER break_glass_sessions_no_truncate BEFORE TRUNCATE ON break_glass_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER break_glass_reviews_append_only BEFORE UPDATE OR DELETE ON break_glass_reviews
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER break_glass_reviews_no_truncate BEFORE TRUNCATE ON break_glass_reviews
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

GRANT SELECT, INSERT ON break_glass_sessions, break_glass_reviews TO custodian_app;
