-- The search index: what a search narrows its candidates with, maintained in the same
-- transaction as the resource version it describes (a new version replaces its resource's rows,
-- a deletion removes them). Candidates are always decrypted and re-checked, so the index only
-- has to find a superset of the matches.
--
-- Nothing here is a plaintext identifier of a person: values that identify someone (names,
-- addresses, telecom, identifiers, and dates tied to a person) are stored as keyed blind
-- indexes ('h:' + truncated HMAC under the tenant's index key); codes, quantities, references
-- to resource ids, uris and the dates of non-personal resources are stored as they are.

-- Token, reference, uri, string and blinded terms: one row per (resource, parameter, term).
CREATE TABLE search_terms (
    tenant         TEXT NOT NULL,
    resource_type  TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    param          TEXT NOT NULL,
    term           TEXT NOT NULL
);
CREATE INDEX search_terms_lookup ON search_terms (tenant, resource_type, param, term, resource_id);
CREATE INDEX search_terms_by_resource ON search_terms (tenant, resource_type, resource_id);

-- Date ranges [low, high) in microseconds since the epoch (UTC), of non-identifying dates.
CREATE TABLE search_dates (
    tenant         TEXT NOT NULL,
    resource_type  TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    param          TEXT NOT NULL,
    low            INTEGER NOT NULL,
    high           INTEGER NOT NULL
);
CREATE INDEX search_dates_lookup ON search_dates (tenant, resource_type, param, low, high);
CREATE INDEX search_dates_by_resource ON search_dates (tenant, resource_type, resource_id);

-- Numbers and quantities: the precision range [low, high) of the value.
CREATE TABLE search_numbers (
    tenant         TEXT NOT NULL,
    resource_type  TEXT NOT NULL,
    resource_id    TEXT NOT NULL,
    param          TEXT NOT NULL,
    low            REAL NOT NULL,
    high           REAL NOT NULL
);
CREATE INDEX search_numbers_lookup ON search_numbers (tenant, resource_type, param, low, high);
CREATE INDEX search_numbers_by_resource ON search_numbers (tenant, resource_type, resource_id);
