-- FHIR Bulk Data $export (see migrations/sqlite/0008_export.sql for the notes).
CREATE TABLE export_jobs (
    tenant          TEXT    NOT NULL,
    job_id          TEXT    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    requester       TEXT    NOT NULL,
    spec            BYTEA   NOT NULL,
    spec_key_id     TEXT    NOT NULL,
    transaction_us  BIGINT  NOT NULL,
    expires_us      BIGINT  NOT NULL,
    lease_owner     TEXT,
    lease_until_us  BIGINT,
    attempts        BIGINT  NOT NULL DEFAULT 0,
    exported        BIGINT  NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (tenant, job_id)
);
CREATE INDEX export_jobs_by_status ON export_jobs (status, lease_until_us);
CREATE INDEX export_jobs_by_expiry ON export_jobs (expires_us);

CREATE TABLE export_chunks (
    tenant          TEXT    NOT NULL,
    job_id          TEXT    NOT NULL,
    chunk_no        BIGINT  NOT NULL,
    resource_type   TEXT    NOT NULL,
    compartment     TEXT,
    key_id          TEXT    NOT NULL,
    line_count      BIGINT  NOT NULL,
    body            BYTEA   NOT NULL,
    PRIMARY KEY (tenant, job_id, chunk_no)
);
CREATE INDEX export_chunks_by_type ON export_chunks (tenant, job_id, resource_type, chunk_no);
CREATE INDEX export_chunks_by_compartment ON export_chunks (tenant, compartment);

-- Jobs are work items, not records of accountability: the application updates and deletes them
-- (lease, progress, cancel, expiry).
GRANT SELECT, INSERT, UPDATE, DELETE ON export_jobs, export_chunks TO custodian_app;
