-- Data keys (DEKs), one per patient compartment and one per tenant, stored only wrapped by a
-- key-encryption key (KEK) of the key provider. Rotation re-wraps them (kek_id, wrapped) without
-- touching resource bodies. Bodies reference their key by key_id (resource_versions.key_id).
CREATE TABLE data_keys (
    key_id       TEXT    PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    compartment  TEXT,
    kek_id       TEXT    NOT NULL,
    wrapped      BYTEA    NOT NULL,
    created_us   BIGINT NOT NULL,
    rewrapped_us BIGINT
);
CREATE UNIQUE INDEX data_keys_one_per_compartment ON data_keys (tenant, compartment)
    WHERE compartment IS NOT NULL;
CREATE UNIQUE INDEX data_keys_one_per_tenant ON data_keys (tenant) WHERE compartment IS NULL;
CREATE INDEX data_keys_by_kek ON data_keys (kek_id);
