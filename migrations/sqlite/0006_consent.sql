-- Consent enforcement and break-the-glass.
--
-- A patient's Consents are looked up on every request that touches their compartment; this
-- partial index finds them without walking the whole compartment (a patient may have thousands
-- of resources and a handful of Consents).
CREATE INDEX resource_versions_consents ON resource_versions (tenant, compartment, resource_id)
    WHERE resource_type = 'Consent';

-- Break-the-glass sessions: the first emergency override made with an access token opens one,
-- time-boxed; later overrides with the same token ride on it until it expires. `token_hash` is
-- a SHA-256 of the token (never the token); `reason` is the caller's free text sealed with
-- AES-GCM under a key derived from the tenant's data key (it may name a patient).
CREATE TABLE break_glass_sessions (
    tenant      TEXT    NOT NULL,
    session_id  TEXT    NOT NULL,
    token_hash  TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    fhir_user   TEXT,
    roles       TEXT    NOT NULL,
    opened_us   INTEGER NOT NULL,
    expires_us  INTEGER NOT NULL,
    reason      BLOB    NOT NULL,
    PRIMARY KEY (tenant, session_id)
);
CREATE UNIQUE INDEX break_glass_sessions_by_token ON break_glass_sessions (tenant, token_hash);
CREATE INDEX break_glass_sessions_by_time ON break_glass_sessions (tenant, opened_us);

-- Compliance reviews of break-the-glass sessions; the latest review of a session is its status.
-- `note` is sealed like the reason.
CREATE TABLE break_glass_reviews (
    tenant      TEXT    NOT NULL,
    session_id  TEXT    NOT NULL,
    reviewed_us INTEGER NOT NULL,
    reviewer    TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('justified', 'unjustified', 'needs-follow-up')),
    note        BLOB,
    PRIMARY KEY (tenant, session_id, reviewed_us, reviewer)
);

-- Both are records of accountability: append-only, like the audit log.
CREATE TRIGGER break_glass_sessions_no_update BEFORE UPDATE ON break_glass_sessions
    BEGIN SELECT RAISE(ABORT, 'break_glass_sessions is append-only'); END;
CREATE TRIGGER break_glass_sessions_no_delete BEFORE DELETE ON break_glass_sessions
    BEGIN SELECT RAISE(ABORT, 'break_glass_sessions is append-only'); END;
CREATE TRIGGER break_glass_reviews_no_update BEFORE UPDATE ON break_glass_reviews
    BEGIN SELECT RAISE(ABORT, 'break_glass_reviews is append-only'); END;
CREATE TRIGGER break_glass_reviews_no_delete BEFORE DELETE ON break_glass_reviews
    BEGIN SELECT RAISE(ABORT, 'break_glass_reviews is append-only'); END;
