//! What the search index keeps of a resource, and how it is blinded.
//!
//! Per parameter value (see `migrations/*/0004_search.sql` for the tables):
//! - token: `c:{code}` (any system), `s:{system}|{code}`, `n:{code}` (no system), `y:{system}`;
//! - reference: `r:{Type}/{id}`, `i:{id}` (a bare id), `u:{url}` (absolute, urn, canonical);
//! - uri: `u:{uri}`;
//! - string: `e:{normalized}` (case- and accent-folded);
//! - date: a row of `search_dates` with its range; number and quantity: a row of
//!   `search_numbers` with the precision range;
//! - a parameter whose values gave none of the above (a token with only a display text, a
//!   reference with only a display): the presence term `?`, so that `:missing` still sees it.
//!   Any row of a parameter marks it present; a presence row for every parameter of every
//!   resource was a third of the index.
//!
//! Identifying values ([`ParamDef::identifying`]) never reach the index in clear: each term is
//! replaced by `h:` + the first 64 bits of HMAC-SHA256(index key, parameter ‖ 0 ‖ term), the
//! index key being derived from the tenant's data key (itself wrapped by the KMS). Strings add
//! blinded prefixes of fixed lengths ([`PREFIX_LENGTHS`]) so that the default starts-with match
//! can use the index; dates add the blinded years their range covers (or `y:wide` for a range
//! of more than [`MAX_BLIND_YEARS`] years). Truncation makes unrelated values collide now and
//! then, which is why every candidate is decrypted and re-checked.

use aws_lc_rs::hmac;
use chrono::{Datelike, TimeZone, Utc};
use serde_json::Value;

use super::registry::{ParamDef, Registry};
use super::values::{self, normalize_string, SearchType, SearchValue};
use crate::store::IndexRows;

/// The prefix lengths (in characters, after normalization) kept for identifying strings.
/// Four lengths keep the index of a name or address small (each is one more blinded row per
/// value part); a query longer than a length uses the next shorter one and the re-check does
/// the rest.
pub const PREFIX_LENGTHS: &[usize] = &[1, 3, 5, 8];

/// A date range covering more years than this is indexed as "wide" instead of year by year.
pub const MAX_BLIND_YEARS: i32 = 60;

/// The presence term of a parameter that has values but no other row (see the module docs).
pub const PRESENCE: &str = "?";

/// Longest term kept, in characters: longer values are cut (the re-check stays exact), which
/// keeps index rows within PostgreSQL's B-tree row limit.
pub const MAX_TERM_CHARS: usize = 256;

/// A term cut to [`MAX_TERM_CHARS`]; queries cut their terms the same way.
pub fn clip(term: String) -> String {
    match term.char_indices().nth(MAX_TERM_CHARS) {
        Some((cut, _)) => term[..cut].to_string(),
        None => term,
    }
}

/// Keyed blinding of identifying terms under one tenant's index key.
pub struct Blinder {
    key: hmac::Key,
}

impl Blinder {
    /// A blinder over a 32-byte index key.
    pub fn new(key: &[u8]) -> Blinder {
        Blinder {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// `h:` + 64 bits of the keyed hash of `term` for `param`, in hex.
    pub fn blind(&self, param: &str, term: &str) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(param.as_bytes());
        context.update(&[0]);
        context.update(term.as_bytes());
        let tag = context.sign();
        let mut text = String::with_capacity(18);
        text.push_str("h:");
        for byte in &tag.as_ref()[..8] {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// The term as stored: blinded when the parameter is identifying.
    pub fn term(&self, definition: &ParamDef, term: String) -> String {
        if definition.identifying {
            self.blind(&definition.code, &term)
        } else {
            term
        }
    }
}

/// Token terms of one value (before blinding).
pub fn token_terms(system: Option<&str>, code: Option<&str>) -> Vec<String> {
    let mut terms = Vec::new();
    if let Some(code) = code {
        terms.push(format!("c:{code}"));
        match system {
            Some(system) => terms.push(format!("s:{system}|{code}")),
            None => terms.push(format!("n:{code}")),
        }
    }
    if let Some(system) = system {
        terms.push(format!("y:{system}"));
    }
    terms
}

/// The first `length` characters of a normalized string, as a prefix term.
pub fn prefix_term(normalized: &str, length: usize) -> String {
    let prefix: String = normalized.chars().take(length).collect();
    format!("p{length}:{prefix}")
}

/// The year terms of a date range (before blinding).
pub fn year_terms(low: i64, high: i64) -> Vec<String> {
    let (Some(first), Some(last)) = (year_of(low), year_of(high.saturating_sub(1))) else {
        return vec!["y:wide".into()];
    };
    if last - first >= MAX_BLIND_YEARS || last < first {
        return vec!["y:wide".into()];
    }
    (first..=last).map(|year| format!("y:{year}")).collect()
}

/// The calendar year (UTC) of an instant in microseconds, for instants chrono can represent.
pub fn year_of(micros: i64) -> Option<i32> {
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    Utc.timestamp_micros(micros)
        .single()
        .map(|instant| instant.year())
}

/// The index rows of a resource: every parameter served on its type.
pub fn index_rows(
    registry: &Registry,
    blinder: &Blinder,
    resource_type: &str,
    resource: &Value,
) -> IndexRows {
    let mut rows = IndexRows::default();
    for definition in registry.all_of(resource_type) {
        if definition.code == "_id" || definition.search_type == SearchType::Composite {
            continue;
        }
        let found = values::extract(&definition.expression, definition.search_type, resource);
        if found.is_empty() {
            continue;
        }
        let code = &definition.code;
        let ranges_before = rows.dates.len() + rows.numbers.len();
        let mut terms: Vec<String> = Vec::new();
        for value in &found {
            match value {
                SearchValue::Token { system, code, .. } => {
                    for term in token_terms(system.as_deref(), code.as_deref()) {
                        terms.push(blinder.term(definition, term));
                    }
                }
                SearchValue::Reference {
                    reference,
                    resource_type,
                    id,
                    ..
                } => {
                    if let (Some(target), Some(id)) = (resource_type, id) {
                        terms.push(format!("r:{target}/{id}"));
                        terms.push(format!("i:{id}"));
                    }
                    if let Some(reference) = reference {
                        if reference.contains(':') {
                            terms.push(format!("u:{reference}"));
                            if let Some((url, _version)) = reference.split_once('|') {
                                terms.push(format!("u:{url}"));
                            }
                        }
                    }
                }
                SearchValue::Uri(uri) => terms.push(blinder.term(definition, format!("u:{uri}"))),
                SearchValue::String(text) => {
                    let normalized = normalize_string(text);
                    if definition.identifying {
                        let length = normalized.chars().count();
                        for &prefix in PREFIX_LENGTHS.iter().filter(|&&prefix| prefix <= length) {
                            terms.push(blinder.blind(code, &prefix_term(&normalized, prefix)));
                        }
                        terms.push(blinder.blind(code, &format!("e:{normalized}")));
                    } else {
                        terms.push(format!("e:{normalized}"));
                    }
                }
                SearchValue::Date { low, high } => {
                    if definition.identifying {
                        for term in year_terms(*low, *high) {
                            terms.push(blinder.blind(code, &term));
                        }
                    } else {
                        rows.dates.push((code.clone(), *low, *high));
                    }
                }
                SearchValue::Quantity { low, high, .. } | SearchValue::Number { low, high, .. } => {
                    rows.numbers.push((code.clone(), *low, *high));
                }
            }
        }
        if terms.is_empty() && rows.dates.len() + rows.numbers.len() == ranges_before {
            terms.push(PRESENCE.to_string());
        }
        let mut terms: Vec<String> = terms.into_iter().map(clip).collect();
        terms.sort();
        terms.dedup();
        rows.terms
            .extend(terms.into_iter().map(|term| (code.clone(), term)));
    }
    rows
}
