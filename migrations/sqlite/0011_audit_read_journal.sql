-- Reads' audit records are committed first to a journal database beside this one
-- (`<database>-read-audit`, see ReadAuditJournal in src/store/sql.rs) and copied into
-- audit_records by the sequencer. This table keeps, per journal (its random identity), the
-- highest journal id copied; it commits in the same transaction as the copied records, so each
-- record is copied exactly once across processes and restarts.
CREATE TABLE audit_journal_progress (
    journal        TEXT    PRIMARY KEY,
    copied_through INTEGER NOT NULL
);
