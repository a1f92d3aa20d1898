-- Erasure (Patient/$erase) and legal holds. Nothing here names a person: compartments appear
-- only as their random pseudonyms, and a hold's case reference is an opaque docket number.

-- Tombstones: one row per erased patient compartment, kept forever. It proves that (and when)
-- the compartment was erased without saying whose it was. `erasure_id` orders the rows, so that
-- every node can pick up erasures made by another node (to drop cached data keys) by asking for
-- the rows after the last one it saw. The application only ever inserts here.
CREATE TABLE erasures (
    erasure_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant            TEXT    NOT NULL,
    pseudonym         TEXT    NOT NULL,
    -- The data keys destroyed (ids only, comma-separated): caches drop them by id.
    key_ids           TEXT    NOT NULL,
    resources_erased  BIGINT  NOT NULL,
    erased_us         BIGINT  NOT NULL,
    CONSTRAINT erasures_once UNIQUE (tenant, pseudonym)
);

-- Legal holds: while a compartment is listed here, $erase refuses it (409). Placed and released
-- by the operator (`custodian erasure hold|release`).
CREATE TABLE legal_holds (
    tenant          TEXT    NOT NULL,
    pseudonym       TEXT    NOT NULL,
    case_reference  TEXT    NOT NULL,
    placed_us       BIGINT  NOT NULL,
    PRIMARY KEY (tenant, pseudonym)
);

-- Tombstones are append-only for the application role; holds come and go.
GRANT SELECT, INSERT ON erasures TO custodian_app;
GRANT SELECT, INSERT, DELETE ON legal_holds TO custodian_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO custodian_app;
