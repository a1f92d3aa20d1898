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
//! of more than [`MAX_BLIND_YEARS`] years), and the blinded month (`m:`) and day (`d:`) when
//! the range lies within one. Truncation makes unrelated values collide now and then, which is
//! why every candidate is decrypted and re-checked.
//!
//! What the index holds is versioned ([`INDEX_FORMAT`]): a database indexed under an older
//! format is rebuilt before it is searched (see [`super::reindex`]), because a query built for
//! the new terms would silently miss resources indexed under the old ones.

use aws_lc_rs::hmac;
use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use serde_json::Value;

use super::registry::{ParamDef, Registry};
use super::values::{self, normalize_string, SearchType, SearchValue};
use crate::store::IndexRows;

/// The format of the index rows written by this build. Raise it whenever [`index_rows`] would
/// write different rows for the same resource; the rows of every stored resource are then
/// rebuilt at the next start ([`super::reindex`]).
///
/// 1. Prefixes of 1, 3, 5 and 8 characters; identifying dates blinded by year.
/// 2. Every prefix length up to 16 characters, then 20, 24 and 32; identifying dates also by
///    month and day when their range lies within one.
pub const INDEX_FORMAT: i64 = 2;

/// The prefix lengths (in characters, after normalization) kept for identifying strings.
///
/// Every length up to 16, so that a starts-with query of up to 16 characters finds exactly
/// the values that start with it: with gaps (format 1 kept 1, 3, 5 and 8) a query of 11
/// characters had to use the 8-character prefix, and every value sharing those 8 characters
/// was decrypted and re-checked — 1,250 patients to return two, on the search benchmark's
/// 10,000. The price is index size (one row per length per value part: about 15 for a name)
/// and what the index shows of a value: whether two values share their first n characters,
/// for each n up to 16, where format 1 showed it for four values of n. A query longer than
/// 16 characters uses the longest prefix within it and the re-check does the rest.
pub const PREFIX_LENGTHS: &[usize] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 24, 32,
];

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
    date_of(micros).map(|date| date.year())
}

/// The calendar date (UTC) of an instant in microseconds, for instants chrono can represent.
fn date_of(micros: i64) -> Option<NaiveDate> {
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    Utc.timestamp_micros(micros)
        .single()
        .map(|instant| instant.date_naive())
}

/// The month term (`m:YYYY-MM`) of a date range `[low, high)` lying within one calendar month
/// (UTC), and its day term (`d:YYYY-MM-DD`) when it lies within one day (before blinding).
/// An `eq` query of a day or a month then finds its candidates among the values of that day or
/// month instead of those of the whole year: the values it can match lie inside its range.
pub fn day_and_month_terms(low: i64, high: i64) -> Vec<String> {
    let (Some(first), Some(last)) = (date_of(low), date_of(high.saturating_sub(1))) else {
        return Vec::new();
    };
    let mut terms = Vec::new();
    if (first.year(), first.month()) == (last.year(), last.month()) && low < high {
        terms.push(month_term(first));
        if first == last {
            terms.push(day_term(first));
        }
    }
    terms
}

/// The month term of a date (see [`day_and_month_terms`]).
pub fn month_term(date: NaiveDate) -> String {
    format!("m:{:04}-{:02}", date.year(), date.month())
}

/// The day term of a date (see [`day_and_month_terms`]).
pub fn day_term(date: NaiveDate) -> String {
    format!("d:{date}")
}

/// The one day (`d:`) or month (`m:`) term that every value inside the range `[low, high)`
/// carries, when the range lies within one day or one month (UTC); `None` otherwise.
pub fn narrowest_term_within(low: i64, high: i64) -> Option<String> {
    let first = date_of(low)?;
    let last = date_of(high.saturating_sub(1))?;
    if low >= high || (first.year(), first.month()) != (last.year(), last.month()) {
        return None;
    }
    Some(if first == last {
        day_term(first)
    } else {
        month_term(first)
    })
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
                        for term in year_terms(*low, *high)
                            .into_iter()
                            .chain(day_and_month_terms(*low, *high))
                        {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .expect("a test instant")
            .timestamp_micros()
    }

    #[test]
    fn every_prefix_up_to_sixteen_characters_is_kept() {
        let lengths: Vec<usize> = PREFIX_LENGTHS.to_vec();
        for length in 1..=16 {
            assert!(lengths.contains(&length), "no prefix of {length}");
        }
        assert!(lengths.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn a_range_within_one_day_carries_its_day_and_month() {
        let (low, high) = (
            micros("1950-05-06T00:00:00Z"),
            micros("1950-05-07T00:00:00Z"),
        );
        assert_eq!(
            day_and_month_terms(low, high),
            vec!["m:1950-05".to_string(), "d:1950-05-06".to_string()]
        );
        assert_eq!(
            narrowest_term_within(low, high).as_deref(),
            Some("d:1950-05-06")
        );
        // A second inside that day: the same day.
        let second = micros("1950-05-06T13:14:15Z");
        assert_eq!(
            narrowest_term_within(second, second + 1_000_000).as_deref(),
            Some("d:1950-05-06")
        );
    }

    #[test]
    fn a_month_carries_its_month_only_and_wider_ranges_neither() {
        let (may, june) = (
            micros("1950-05-01T00:00:00Z"),
            micros("1950-06-01T00:00:00Z"),
        );
        assert_eq!(
            day_and_month_terms(may, june),
            vec!["m:1950-05".to_string()]
        );
        assert_eq!(
            narrowest_term_within(may, june).as_deref(),
            Some("m:1950-05")
        );
        let next_year = micros("1951-01-01T00:00:00Z");
        assert!(day_and_month_terms(may, next_year).is_empty());
        assert_eq!(narrowest_term_within(may, next_year), None);
        // Two days across a month's end: neither one day nor one month.
        let (last_day, second_day) = (
            micros("1950-05-31T00:00:00Z"),
            micros("1950-06-02T00:00:00Z"),
        );
        assert!(day_and_month_terms(last_day, second_day).is_empty());
        assert_eq!(narrowest_term_within(i64::MIN, i64::MAX), None);
        assert!(day_and_month_terms(i64::MIN, i64::MAX).is_empty());
    }
}
