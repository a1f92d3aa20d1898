//! The integration suite: one binary (one link), every test against the real server over HTTP,
//! each on SQLite and on PostgreSQL.

mod helpers;

mod audit;
mod authz;
mod bad_input;
mod bundle;
mod conditional;
mod consent;
mod crud;
mod encryption;
mod erasure;
mod everything;
mod examples;
mod export;
mod faults;
mod formats;
mod history;
mod import;
mod logs;
mod metadata;
mod moto;
mod oidc;
mod oracle;
mod patch;
mod rate_limit;
mod search;
