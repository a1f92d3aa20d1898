-- Resource versions and their heads. Bodies are opaque bytes (sealed by the envelope encryption);
-- nothing here is a plaintext identifier of a person: ids are server-assigned or client-chosen
-- resource ids, the compartment is a random pseudonym.

-- Every version of every resource, kept until erasure. `sequence` is the global write order that
-- history paging keys on.
CREATE TABLE resource_versions (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant          TEXT    NOT NULL,
    resource_type   TEXT    NOT NULL,
    resource_id     TEXT    NOT NULL,
    version_id      INTEGER NOT NULL CHECK (version_id >= 1),
    method          TEXT    NOT NULL CHECK (method IN ('POST', 'PUT', 'DELETE')),
    last_updated_us INTEGER NOT NULL,
    deleted         INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    compartment     TEXT,
    key_id          TEXT,
    body            BLOB,
    CHECK ((deleted = 1 AND body IS NULL) OR (deleted = 0 AND body IS NOT NULL)),
    CONSTRAINT resource_versions_identity UNIQUE (tenant, resource_type, resource_id, version_id)
);
CREATE INDEX resource_versions_by_type ON resource_versions (tenant, resource_type, sequence);
CREATE INDEX resource_versions_by_tenant ON resource_versions (tenant, sequence);
CREATE INDEX resource_versions_by_compartment ON resource_versions (tenant, compartment);

-- The current version of each resource: the row that optimistic concurrency updates
-- conditionally, so that of two racing writers exactly one wins.
CREATE TABLE resource_heads (
    tenant          TEXT    NOT NULL,
    resource_type   TEXT    NOT NULL,
    resource_id     TEXT    NOT NULL,
    version_id      INTEGER NOT NULL,
    deleted         INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    PRIMARY KEY (tenant, resource_type, resource_id)
);

-- Patient compartments: the pseudonym stored on rows instead of the patient's resource id, so
-- that erasure (destroying the compartment's key) and audit can name a compartment without
-- naming a person.
CREATE TABLE patient_compartments (
    tenant      TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    pseudonym   TEXT NOT NULL UNIQUE,
    PRIMARY KEY (tenant, patient_id)
);
