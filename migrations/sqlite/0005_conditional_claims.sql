-- Claims of conditional creates (If-None-Exist, a transaction entry's ifNoneExist): a create
-- made because its criteria matched nothing inserts the keyed hash of its type and criteria
-- here, in its own transaction. A concurrent create with the same criteria then finds the claim
-- taken, fails its transaction and retries its search, which now finds the first one: exactly
-- one resource. A claim older than a minute may be taken over (its resource may since have
-- changed or been deleted), so claims never block a later create for long. No PHI: the key is
-- an HMAC under the tenant's index key.
CREATE TABLE conditional_claims (
    tenant      TEXT NOT NULL,
    claim_key   TEXT NOT NULL,
    created_us  INTEGER NOT NULL,
    PRIMARY KEY (tenant, claim_key)
);
