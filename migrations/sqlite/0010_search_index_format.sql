-- Which format of the search index (`INDEX_FORMAT` in src/search/index.rs) each tenant's rows
-- were written in. A tenant without a row, or with an older format, has its index rebuilt from
-- the stored resources before its node serves a search: a query built for the new terms would
-- otherwise silently miss the resources indexed under the old ones.
CREATE TABLE search_index_format (
    tenant  TEXT PRIMARY KEY,
    format  BIGINT NOT NULL
);
