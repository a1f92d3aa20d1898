-- FHIR Bulk Data $export (src/export/): jobs and their sealed output.
--
-- A job row holds no PHI in clear: `requester` is a SHA-256 of the token's issuer and subject
-- (only that caller may poll, download or cancel), `spec` is the kick-off (the requester's
-- claims, the request URL, the level, `_type`, `_since`) sealed under the tenant's data key.
-- `lease_owner` / `lease_until_us` make one node at a time run a job: a worker takes a job with a
-- conditional update and renews the lease with every batch it writes; a job whose lease ran out
-- (its node stopped) is taken again and restarted from scratch.
CREATE TABLE export_jobs (
    tenant          TEXT    NOT NULL,
    job_id          TEXT    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    requester       TEXT    NOT NULL,
    spec            BLOB    NOT NULL,
    spec_key_id     TEXT    NOT NULL,
    transaction_us  INTEGER NOT NULL,
    expires_us      INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until_us  INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    exported        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (tenant, job_id)
);
CREATE INDEX export_jobs_by_status ON export_jobs (status, lease_until_us);
CREATE INDEX export_jobs_by_expiry ON export_jobs (expires_us);

-- The output: NDJSON lines of one resource type and one patient compartment (NULL: outside
-- every compartment), sealed under that compartment's data key (the tenant's key for NULL), so
-- that destroying a patient's key (erasure) makes their export lines unreadable as well.
CREATE TABLE export_chunks (
    tenant          TEXT    NOT NULL,
    job_id          TEXT    NOT NULL,
    chunk_no        INTEGER NOT NULL,
    resource_type   TEXT    NOT NULL,
    compartment     TEXT,
    key_id          TEXT    NOT NULL,
    line_count      INTEGER NOT NULL,
    body            BLOB    NOT NULL,
    PRIMARY KEY (tenant, job_id, chunk_no)
);
CREATE INDEX export_chunks_by_type ON export_chunks (tenant, job_id, resource_type, chunk_no);
CREATE INDEX export_chunks_by_compartment ON export_chunks (tenant, compartment);
