//! Whether a resource's search values satisfy one criterion
//! (<http://hl7.org/fhir/R4/search.html>).
//!
//! The engine extracts a parameter's values from a resource ([`super::values::extract`]) and
//! asks [`matches()`]; chains and `_has` it resolves itself, and composites it evaluates node by
//! node with [`composite_matches`].
//!
//! # Semantics, type by type
//! - **string**: the normalised value ([`normalize_string`]: case, accents and spacing ignored)
//!   starts with the normalised query; `:contains` anywhere in it; `:exact` is equality, case-
//!   and accent-sensitive.
//! - **token**: system and code compared exactly (case-sensitive). `code` matches any system,
//!   `|code` only a code without system, `system|` any code of the system. `:text` is a
//!   normalised starts-with on the token's text (Coding.display, CodeableConcept.text,
//!   Identifier.type.text). `:not` holds when *no* value matches, so a resource without a value
//!   matches, as R4 says. `:of-type` compares the identifier's value only: the values carry
//!   Identifier.type's text but not its coding, so the type cannot be checked and the result
//!   is the same as a plain search on the value.
//! - **reference**: `Type/id` matches the same type and id; a bare id matches that id of any
//!   type (of the `:Type` modifier's type only, with one); a version, when given, must equal the
//!   value's. A relative query matches a value with any service base. An absolute URL matches a
//!   value with the same text (for a canonical, the same URL, and the same version if the query
//!   gives one), or a value naming the same type and id either relatively (taken as this
//!   server's) or with the same base. `:identifier` compares Reference.identifier as a token.
//! - **date**, ranges `[low, high)`: `eq` the value's range lies inside the query's; `ne` not
//!   that; `gt` the value extends past the query's end; `lt` it starts before the query's start;
//!   `ge` is `gt` or `eq` and `le` is `lt` or `eq` (R4's prefix table: a value that straddles
//!   the query's start is neither); `sa` it starts at or after the query's end; `eb` it ends at
//!   or before the query's start; `ap` it overlaps the query's range widened on both sides by
//!   10 % of the time between now and the query's start (R4's recommendation).
//! - **number** and **quantity**: `eq` the value lies in the query's precision range (`100`
//!   covers `[99.5, 100.5)`); `ne` not that; `gt` `lt` `ge` `le` compare the value with the
//!   query's number, `sa` and `eb` as `gt` and `lt`; `ap` is `eq` or within 10 % of the query's
//!   number. A quantity's system and code, when the query gives them, must equal the value's; a
//!   code without system may also equal the value's unit text. Units are not converted: `5 g`
//!   does not match `5000 mg`.
//! - **uri**: exact; `:below` the value starts with the query; `:above` the query starts with
//!   the value (plain prefixes, not path segments).
//! - `:missing=true` holds when the resource has no value, `:missing=false` when it has one.

use std::time::{SystemTime, UNIX_EPOCH};

use super::fhirpath;
use super::query::{Criterion, Modifier, Prefix, QueryValue, TokenSystem};
use super::values::{normalize_string, SearchType, SearchValue};

/// How far `ap` reaches: 10 %, R4's recommended approximation.
const APPROXIMATION: f64 = 0.1;

/// Whether the values a resource has for a [`Criterion::Plain`]'s parameter satisfy it (its
/// alternatives are ORed). Chains and `_has` are resolved by the engine and never match here;
/// nor does a composite, except with `:missing`: see [`composite_matches`].
pub fn matches(criterion: &Criterion, values: &[SearchValue]) -> bool {
    let Criterion::Plain {
        search_type,
        modifier,
        values: alternatives,
        ..
    } = criterion
    else {
        return false;
    };
    let any_match = |modifier: Option<&Modifier>| {
        values.iter().any(|value| {
            alternatives
                .iter()
                .any(|query| value_matches(*search_type, modifier, query, value))
        })
    };
    match modifier {
        Some(Modifier::Missing) => alternatives.iter().any(
            |query| matches!(query, QueryValue::Boolean(missing) if *missing == values.is_empty()),
        ),
        Some(Modifier::Not) => !any_match(None),
        modifier => any_match(modifier.as_ref()),
    }
}

/// Whether one query value matches one resource value. `:not` compares like no modifier (the
/// negation is over all of a resource's values, in [`matches()`]); `:missing` concerns the
/// values as a whole and matches nothing here.
pub fn value_matches(
    search_type: SearchType,
    modifier: Option<&Modifier>,
    query: &QueryValue,
    value: &SearchValue,
) -> bool {
    match search_type {
        SearchType::String => string_matches(modifier, query, value),
        SearchType::Token => token_matches(modifier, query, value),
        SearchType::Reference => reference_matches(modifier, query, value),
        SearchType::Date => date_matches(modifier, query, value),
        SearchType::Number | SearchType::Quantity => numeric_matches(modifier, query, value),
        SearchType::Uri => uri_matches(modifier, query, value),
        SearchType::Composite | SearchType::Special => false,
    }
}

/// For one composite alternative (`query`, one value per component): whether one node, given
/// the values of each of its components (`node_components`, in component order), satisfies
/// every component.
pub fn composite_matches(
    query: &[QueryValue],
    component_types: &[SearchType],
    node_components: &[Vec<SearchValue>],
) -> bool {
    !query.is_empty()
        && query.len() == component_types.len()
        && query.len() == node_components.len()
        && query.iter().zip(component_types).zip(node_components).all(
            |((query, search_type), values)| {
                values
                    .iter()
                    .any(|value| value_matches(*search_type, None, query, value))
            },
        )
}

/// A modifier that compares values the type's plain way.
fn is_plain(modifier: Option<&Modifier>) -> bool {
    matches!(modifier, None | Some(Modifier::Not))
}

fn string_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    let (QueryValue::String(query), SearchValue::String(value)) = (query, value) else {
        return false;
    };
    match modifier {
        Some(Modifier::Exact) => value == query,
        Some(Modifier::Contains) => normalize_string(value).contains(&normalize_string(query)),
        modifier if is_plain(modifier) => {
            normalize_string(value).starts_with(&normalize_string(query))
        }
        _ => false,
    }
}

fn token_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    let SearchValue::Token {
        system: value_system,
        code: value_code,
        text: value_text,
    } = value
    else {
        return false;
    };
    match (modifier, query) {
        (Some(Modifier::Text), QueryValue::String(text)) => {
            value_text.as_deref().is_some_and(|value_text| {
                normalize_string(value_text).starts_with(&normalize_string(text))
            })
        }
        // The identifier's type is not among the values (see the module documentation).
        (Some(Modifier::OfType), QueryValue::OfType { value: wanted, .. }) => {
            value_code.as_deref() == Some(wanted.as_str())
        }
        (modifier, QueryValue::Token { system, code }) if is_plain(modifier) => token_fits(
            system,
            code.as_deref(),
            value_system.as_deref(),
            value_code.as_deref(),
        ),
        _ => false,
    }
}

/// A token query against a system and code.
fn token_fits(
    system: &TokenSystem,
    code: Option<&str>,
    value_system: Option<&str>,
    value_code: Option<&str>,
) -> bool {
    let system_fits = match system {
        TokenSystem::Any => true,
        TokenSystem::NoSystem => value_system.is_none(),
        TokenSystem::Is(system) => value_system == Some(system.as_str()),
    };
    let code_fits = match code {
        Some(code) => value_code == Some(code),
        // `system|`; a query with neither system nor code is not something the parser makes,
        // and must not match everything.
        None => matches!(system, TokenSystem::Is(_)),
    };
    system_fits && code_fits
}

fn reference_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    match (modifier, query, value) {
        (
            Some(Modifier::Identifier),
            QueryValue::Token { system, code },
            SearchValue::Reference {
                identifier: Some((identifier_system, identifier_value)),
                ..
            },
        ) => token_fits(
            system,
            code.as_deref(),
            identifier_system.as_deref(),
            Some(identifier_value),
        ),
        (None | Some(Modifier::Not) | Some(Modifier::Type(_)), _, _) => {
            reference_fits(query, value)
        }
        _ => false,
    }
}

fn reference_fits(query: &QueryValue, value: &SearchValue) -> bool {
    let QueryValue::Reference {
        resource_type,
        id,
        version,
        url,
    } = query
    else {
        return false;
    };
    let SearchValue::Reference {
        reference,
        resource_type: value_type,
        id: value_id,
        version: value_version,
        ..
    } = value
    else {
        return false;
    };
    let version_fits = |value_version: Option<&str>| {
        version
            .as_deref()
            .is_none_or(|wanted| value_version == Some(wanted))
    };
    let same_resource = || {
        resource_type.is_some()
            && value_type == resource_type
            && id.is_some()
            && value_id == id
            && version_fits(value_version.as_deref())
    };
    let Some(url) = url else {
        // Relative, or a bare id (typed by a `:Type` modifier or not).
        return id.is_some()
            && value_id == id
            && resource_type
                .as_deref()
                .is_none_or(|wanted| value_type.as_deref() == Some(wanted))
            && version_fits(value_version.as_deref());
    };
    let Some(reference) = reference else {
        return false;
    };
    let (value_url, canonical_version) = match reference.split_once('|') {
        Some((value_url, canonical_version)) => (value_url, Some(canonical_version)),
        None => (reference.as_str(), None),
    };
    if value_url == url && version_fits(canonical_version.or(value_version.as_deref())) {
        return true;
    }
    let value_base = fhirpath::parse_literal_reference(reference).and_then(|l| l.base);
    let query_base = fhirpath::parse_literal_reference(url).and_then(|l| l.base);
    value_base.is_none_or(|base| Some(base) == query_base) && same_resource()
}

fn date_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    match (query, value) {
        (
            QueryValue::Date { prefix, low, high },
            SearchValue::Date {
                low: value_low,
                high: value_high,
            },
        ) if is_plain(modifier) => date_fits(
            *prefix,
            (*low, *high),
            (*value_low, *value_high),
            now_micros,
        ),
        _ => false,
    }
}

/// The date comparison, with the clock passed in (only `ap` reads it).
fn date_fits(
    prefix: Prefix,
    (query_low, query_high): (i64, i64),
    (value_low, value_high): (i64, i64),
    now: impl FnOnce() -> i64,
) -> bool {
    let inside = value_low >= query_low && value_high <= query_high;
    match prefix {
        Prefix::Eq => inside,
        Prefix::Ne => !inside,
        Prefix::Gt => value_high > query_high,
        Prefix::Lt => value_low < query_low,
        // R4's table: ge is gt or eq, le is lt or eq (a value that straddles the start of
        // the searched range is neither).
        Prefix::Ge => value_high > query_high || inside,
        Prefix::Le => value_low < query_low || inside,
        Prefix::Sa => value_low >= query_high,
        Prefix::Eb => value_high <= query_low,
        Prefix::Ap => {
            // A tenth (APPROXIMATION) of the distance from now, in i128 because open ends are
            // i64::MIN and i64::MAX.
            let margin = (i128::from(now()) - i128::from(query_low)).abs() / 10;
            i128::from(value_low) < i128::from(query_high) + margin
                && i128::from(value_high) > i128::from(query_low) - margin
        }
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
}

fn numeric_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    if !is_plain(modifier) {
        return false;
    }
    let value_number = match value {
        SearchValue::Number { value, .. } | SearchValue::Quantity { value, .. } => *value,
        _ => return false,
    };
    match query {
        QueryValue::Number {
            prefix,
            value,
            low,
            high,
        } => number_fits(*prefix, *value, (*low, *high), value_number),
        QueryValue::Quantity {
            prefix,
            value: query_number,
            low,
            high,
            system,
            code,
        } => {
            let (value_system, value_code, value_unit) = match value {
                SearchValue::Quantity {
                    system, code, unit, ..
                } => (system.as_deref(), code.as_deref(), unit.as_deref()),
                _ => (None, None, None),
            };
            let system_fits = system
                .as_deref()
                .is_none_or(|system| value_system == Some(system));
            let code_fits = code.as_deref().is_none_or(|code| {
                value_code == Some(code) || (system.is_none() && value_unit == Some(code))
            });
            system_fits
                && code_fits
                && number_fits(*prefix, *query_number, (*low, *high), value_number)
        }
        _ => false,
    }
}

/// A number comparison: `query` with its precision range against the resource's number.
fn number_fits(prefix: Prefix, query: f64, (low, high): (f64, f64), value: f64) -> bool {
    let inside = low <= value && value < high;
    match prefix {
        Prefix::Eq => inside,
        Prefix::Ne => !inside,
        Prefix::Gt | Prefix::Sa => value > query,
        Prefix::Lt | Prefix::Eb => value < query,
        Prefix::Ge => value >= query,
        Prefix::Le => value <= query,
        Prefix::Ap => inside || (value - query).abs() <= (query * APPROXIMATION).abs(),
    }
}

fn uri_matches(modifier: Option<&Modifier>, query: &QueryValue, value: &SearchValue) -> bool {
    let (QueryValue::Uri(query), SearchValue::Uri(value)) = (query, value) else {
        return false;
    };
    match modifier {
        Some(Modifier::Below) => value.starts_with(query.as_str()),
        Some(Modifier::Above) => !value.is_empty() && query.starts_with(value.as_str()),
        modifier if is_plain(modifier) => value == query,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::query::{parse, ParameterInfo, ParameterLookup};
    use super::super::values::{parse_date_range, parse_decimal_range};
    use super::*;

    const LOINC: &str = "http://loinc.org";
    const UCUM: &str = "http://unitsofmeasure.org";

    /// One parameter of each type on the resource type `Test`, named after its type.
    struct TestLookup;

    impl ParameterLookup for TestLookup {
        fn lookup(&self, _resource_type: &str, code: &str) -> Option<ParameterInfo> {
            let (search_type, targets, components): (SearchType, &[&str], &[SearchType]) =
                match code {
                    "string" => (SearchType::String, &[], &[]),
                    "token" => (SearchType::Token, &[], &[]),
                    "reference" => (SearchType::Reference, &["Patient", "Group"], &[]),
                    "any-reference" => (SearchType::Reference, &[], &[]),
                    "date" => (SearchType::Date, &[], &[]),
                    "number" => (SearchType::Number, &[], &[]),
                    "quantity" => (SearchType::Quantity, &[], &[]),
                    "uri" => (SearchType::Uri, &[], &[]),
                    "composite" => (
                        SearchType::Composite,
                        &[],
                        &[SearchType::Token, SearchType::Quantity],
                    ),
                    _ => return None,
                };
            Some(ParameterInfo {
                search_type,
                targets: targets.iter().map(|t| (*t).to_owned()).collect(),
                components: components.to_vec(),
            })
        }
    }

    /// The criterion of `name=value` on `Test`.
    fn criterion(name: &str, value: &str) -> Criterion {
        let pairs = [(name.to_owned(), value.to_owned())];
        let parsed = parse(Some("Test"), &pairs, &TestLookup)
            .unwrap_or_else(|error| panic!("{name}={value}: {error}"));
        match <[Criterion; 1]>::try_from(parsed.criteria) {
            Ok([criterion]) => criterion,
            Err(other) => panic!("{name}={value}: {other:?} {:?}", parsed.ignored),
        }
    }

    /// Runs a table of `(parameter, query value, resource value, expected)`.
    fn check_table(table: &[(&str, &str, SearchValue, bool)]) {
        for (name, query, value, expected) in table {
            let criterion = criterion(name, query);
            assert_eq!(
                matches(&criterion, std::slice::from_ref(value)),
                *expected,
                "{name}={query} against {value:?}"
            );
        }
    }

    fn string(text: &str) -> SearchValue {
        SearchValue::String(text.to_owned())
    }

    fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> SearchValue {
        SearchValue::Token {
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            text: text.map(str::to_owned),
        }
    }

    /// A Reference element's value, parsed as values.rs parses it.
    fn reference(text: &str) -> SearchValue {
        let literal = fhirpath::parse_literal_reference(text);
        SearchValue::Reference {
            reference: Some(text.to_owned()),
            resource_type: literal.map(|l| l.resource_type.to_owned()),
            id: literal.map(|l| l.id.to_owned()),
            version: literal.and_then(|l| l.version).map(str::to_owned),
            identifier: None,
        }
    }

    /// A canonical or uri element under a reference parameter: its text only.
    fn canonical(text: &str) -> SearchValue {
        SearchValue::Reference {
            reference: Some(text.to_owned()),
            resource_type: None,
            id: None,
            version: None,
            identifier: None,
        }
    }

    fn identifier_reference(system: Option<&str>, value: &str) -> SearchValue {
        SearchValue::Reference {
            reference: None,
            resource_type: None,
            id: None,
            version: None,
            identifier: Some((system.map(str::to_owned), value.to_owned())),
        }
    }

    fn range(text: &str) -> (i64, i64) {
        parse_date_range(text).unwrap_or_else(|| panic!("{text}"))
    }

    fn date(text: &str) -> SearchValue {
        let (low, high) = range(text);
        SearchValue::Date { low, high }
    }

    /// A Period; `None` for an open end.
    fn period(start: Option<&str>, end: Option<&str>) -> SearchValue {
        SearchValue::Date {
            low: start.map_or(i64::MIN, |start| range(start).0),
            high: end.map_or(i64::MAX, |end| range(end).1),
        }
    }

    fn decimal(text: &str) -> (f64, f64, f64) {
        parse_decimal_range(text).unwrap_or_else(|| panic!("{text}"))
    }

    fn number(text: &str) -> SearchValue {
        let (value, low, high) = decimal(text);
        SearchValue::Number { value, low, high }
    }

    fn quantity(
        text: &str,
        system: Option<&str>,
        code: Option<&str>,
        unit: Option<&str>,
    ) -> SearchValue {
        let (value, low, high) = decimal(text);
        SearchValue::Quantity {
            value,
            low,
            high,
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            unit: unit.map(str::to_owned),
        }
    }

    fn uri(text: &str) -> SearchValue {
        SearchValue::Uri(text.to_owned())
    }

    #[test]
    fn strings_match_by_normalised_prefix_exactly_or_anywhere() {
        check_table(&[
            ("string", "mul", string("Müller"), true),
            ("string", "MÜLLER", string("muller"), true),
            ("string", "ller", string("Müller"), false),
            ("string", "müller  schmidt", string(" Müller Schmidt"), true),
            ("string", "Eve", string("Ev"), false),
            ("string", "Eve", string("Eve"), true),
            ("string", "elise", string("ÉLISE"), true),
            ("string", r"a\,b", string("a,b c"), true),
            ("string", "x", token(None, Some("x"), Some("x")), false),
            ("string:exact", "Müller", string("Müller"), true),
            ("string:exact", "Müller", string("müller"), false),
            ("string:exact", "Muller", string("Müller"), false),
            ("string:exact", "Mül", string("Müller"), false),
            ("string:exact", "Eve", string("Eve "), false),
            ("string:contains", "LLE", string("Müller"), true),
            ("string:contains", "ül", string("Muller"), true),
            ("string:contains", "xyz", string("Müller"), false),
            ("string:contains", "mü", string("Müller"), true),
            // SQL and pattern metacharacters are plain characters.
            ("string", "%", string("abc"), false),
            ("string", "%", string("%abc"), true),
            ("string", "_", string("a"), false),
            ("string", "*", string("anything"), false),
            ("string", ".*", string("anything"), false),
            ("string", "O'B", string("O'Brien"), true),
            ("string", "x' OR '1'='1", string("x"), false),
            ("string:contains", "_", string("a_b"), true),
            ("string:contains", "%", string("100%"), true),
            ("string:contains", "%", string("100"), false),
            ("string:exact", "a;b", string("a;b"), true),
            (
                "string:exact",
                "'; DROP TABLE x; --",
                string("'; drop table x; --"),
                false,
            ),
        ]);
    }

    #[test]
    fn tokens_match_system_and_code_exactly() {
        let weight = token(Some(LOINC), Some("29463-7"), Some("Body Weight"));
        let other_system = token(Some("http://other.org"), Some("29463-7"), None);
        let bare = token(None, Some("29463-7"), None);
        let text_only = token(None, None, Some("Body weight"));
        let identifier = token(Some("urn:oid:1.2.3"), Some("123"), Some("Medical record"));
        check_table(&[
            ("token", "29463-7", weight.clone(), true),
            ("token", "29463-7", bare.clone(), true),
            ("token", "29463-7", other_system.clone(), true),
            ("token", "http://loinc.org|29463-7", weight.clone(), true),
            (
                "token",
                "http://loinc.org|29463-7",
                other_system.clone(),
                false,
            ),
            ("token", "http://loinc.org|29463-7", bare.clone(), false),
            ("token", "|29463-7", bare.clone(), true),
            ("token", "|29463-7", weight.clone(), false),
            ("token", "http://loinc.org|", weight.clone(), true),
            ("token", "http://loinc.org|", other_system.clone(), false),
            ("token", "http://loinc.org|", bare.clone(), false),
            ("token", "http://LOINC.org|29463-7", weight.clone(), false),
            ("token", "29463", weight.clone(), false),
            ("token", "29463-7X", weight.clone(), false),
            ("token", "male", token(None, Some("Male"), None), false),
            ("token", "male", token(None, Some("male"), None), true),
            ("token", r"a\|b", token(None, Some("a|b"), None), true),
            ("token", "%", token(None, Some("x"), None), false),
            ("token", "_", token(None, Some("x"), None), false),
            ("token", "29463-7", text_only.clone(), false),
            ("token", "29463-7", string("29463-7"), false),
            ("token:text", "body", weight.clone(), true),
            ("token:text", "BÖDY wei", weight.clone(), true),
            ("token:text", "body", text_only.clone(), true),
            ("token:text", "weight", weight.clone(), false),
            ("token:text", "29463", weight.clone(), false),
            ("token:text", "x", bare.clone(), false),
            ("token:text", "%", weight.clone(), false),
            (
                "token:of-type",
                "http://terminology.hl7.org/CodeSystem/v2-0203|MR|123",
                identifier.clone(),
                true,
            ),
            (
                "token:of-type",
                "http://terminology.hl7.org/CodeSystem/v2-0203|MR|124",
                identifier.clone(),
                false,
            ),
            ("token:of-type", "|MR|123", identifier, true),
        ]);
    }

    #[test]
    fn token_not_holds_when_no_value_matches() {
        let not_male = criterion("token:not", "male");
        let male = token(None, Some("male"), None);
        let female = token(None, Some("female"), None);
        assert!(matches(&not_male, &[]));
        assert!(!matches(&not_male, std::slice::from_ref(&male)));
        assert!(matches(&not_male, std::slice::from_ref(&female)));
        assert!(!matches(&not_male, &[female.clone(), male.clone()]));
        let neither = criterion("token:not", "male,female");
        assert!(!matches(&neither, std::slice::from_ref(&female)));
        assert!(matches(&neither, &[token(None, Some("other"), None)]));
        let not_system = criterion("token:not", "http://loinc.org|");
        assert!(matches(&not_system, &[male]));
        assert!(!matches(
            &not_system,
            &[token(Some(LOINC), Some("1"), None)]
        ));
    }

    #[test]
    fn missing_looks_at_whether_there_are_values() {
        for name in [
            "string:missing",
            "token:missing",
            "reference:missing",
            "date:missing",
        ] {
            let missing = criterion(name, "true");
            let present = criterion(name, "false");
            let either = criterion(name, "true,false");
            let some_value = [string("x")];
            assert!(matches(&missing, &[]), "{name}");
            assert!(!matches(&missing, &some_value), "{name}");
            assert!(!matches(&present, &[]), "{name}");
            assert!(matches(&present, &some_value), "{name}");
            assert!(
                matches(&either, &[]) && matches(&either, &some_value),
                "{name}"
            );
        }
        assert!(matches(&criterion("composite:missing", "true"), &[]));
        // Missing says nothing about one value.
        assert!(!value_matches(
            SearchType::String,
            Some(&Modifier::Missing),
            &QueryValue::Boolean(false),
            &string("x")
        ));
    }

    #[test]
    fn alternatives_are_ored_and_values_any_of() {
        let either = criterion("string", "abc,xyz");
        assert!(matches(&either, &[string("xyzzy")]));
        assert!(matches(&either, &[string("q"), string("abcd")]));
        assert!(!matches(&either, &[string("q"), string("ab")]));
        assert!(!matches(&either, &[]));
    }

    #[test]
    fn references_match_by_type_id_version_url_or_identifier() {
        let patient = reference("Patient/1");
        let absolute = reference("http://example.org/fhir/Patient/1");
        let versioned = reference("Patient/1/_history/2");
        let absolute_versioned = reference("http://example.org/fhir/Patient/1/_history/2");
        let value_set = "http://example.org/ValueSet/vs";
        check_table(&[
            ("reference", "Patient/1", patient.clone(), true),
            ("reference", "Patient/1", reference("Group/1"), false),
            ("reference", "Patient/2", patient.clone(), false),
            ("reference", "Patient/1", reference("Patient/10"), false),
            ("reference", "1", patient.clone(), true),
            ("reference", "1", reference("Group/1"), true),
            ("reference", "1", reference("#1"), false),
            ("reference:Patient", "1", reference("Group/1"), false),
            ("reference:Patient", "1", patient.clone(), true),
            ("reference:Patient", "Patient/1", patient.clone(), true),
            ("reference", "Patient/1", versioned.clone(), true),
            ("reference", "Patient/1/_history/2", versioned.clone(), true),
            (
                "reference",
                "Patient/1/_history/3",
                versioned.clone(),
                false,
            ),
            ("reference", "Patient/1/_history/2", patient.clone(), false),
            ("reference", "Patient/1", absolute.clone(), true),
            (
                "reference",
                "http://example.org/fhir/Patient/1",
                absolute.clone(),
                true,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1",
                patient.clone(),
                true,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1",
                reference("http://other.org/fhir/Patient/1"),
                false,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1",
                absolute_versioned.clone(),
                true,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1/_history/2",
                absolute_versioned.clone(),
                true,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1/_history/3",
                absolute_versioned,
                false,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1/_history/2",
                versioned,
                true,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/1/_history/2",
                patient.clone(),
                false,
            ),
            (
                "reference",
                "http://example.org/fhir/Patient/2",
                absolute.clone(),
                false,
            ),
            (
                "any-reference",
                value_set,
                canonical("http://example.org/ValueSet/vs|1.0"),
                true,
            ),
            (
                "any-reference",
                "http://example.org/ValueSet/vs|1.0",
                canonical("http://example.org/ValueSet/vs|1.0"),
                true,
            ),
            (
                "any-reference",
                "http://example.org/ValueSet/vs|2.0",
                canonical("http://example.org/ValueSet/vs|1.0"),
                false,
            ),
            (
                "any-reference",
                "http://example.org/ValueSet/vs|1.0",
                canonical(value_set),
                false,
            ),
            ("any-reference", value_set, canonical(value_set), true),
            (
                "any-reference",
                value_set,
                canonical("http://example.org/ValueSet/vs2"),
                false,
            ),
            (
                "any-reference",
                "urn:uuid:0c3151bd",
                reference("urn:uuid:0c3151bd"),
                true,
            ),
            (
                "any-reference",
                "urn:uuid:0c3151bd",
                reference("urn:uuid:0c3151be"),
                false,
            ),
            (
                "reference",
                "Patient/1",
                identifier_reference(Some("http://hospital.org/mrn"), "1"),
                false,
            ),
            (
                "reference:identifier",
                "http://hospital.org/mrn|123",
                identifier_reference(Some("http://hospital.org/mrn"), "123"),
                true,
            ),
            (
                "reference:identifier",
                "123",
                identifier_reference(Some("http://hospital.org/mrn"), "123"),
                true,
            ),
            (
                "reference:identifier",
                "http://other.org|123",
                identifier_reference(Some("http://hospital.org/mrn"), "123"),
                false,
            ),
            (
                "reference:identifier",
                "|123",
                identifier_reference(Some("http://hospital.org/mrn"), "123"),
                false,
            ),
            (
                "reference:identifier",
                "|123",
                identifier_reference(None, "123"),
                true,
            ),
            (
                "reference:identifier",
                "http://hospital.org/mrn|",
                identifier_reference(Some("http://hospital.org/mrn"), "9"),
                true,
            ),
            ("reference:identifier", "123", patient.clone(), false),
            ("reference", "1", string("Patient/1"), false),
        ]);
    }

    #[test]
    fn dates_compare_ranges_with_every_prefix() {
        let day = date("2013-01-14");
        let instant = date("2013-01-14T10:00:00Z");
        let from_2013 = period(Some("2013-01-01"), None);
        let until_mid_2013 = period(None, Some("2013-06-01"));
        let straddling_2013 = period(Some("2012-06-01"), Some("2013-06-01"));
        check_table(&[
            ("date", "2013-01-14", day.clone(), true),
            ("date", "eq2013-01", day.clone(), true),
            ("date", "2013", day.clone(), true),
            ("date", "2013-01-14T10:00", day.clone(), false),
            ("date", "2013-01-15", day.clone(), false),
            ("date", "2013-01-14", instant.clone(), true),
            (
                "date",
                "2013-01-14T10:00:00+01:00",
                date("2013-01-14T09:00:00Z"),
                true,
            ),
            ("date", "2013-01-14T10:00:00Z", instant.clone(), true),
            ("date", "2013-01-14T10:00:01Z", instant.clone(), false),
            ("date", "2013", from_2013.clone(), false),
            ("date", "ne2013-01-14", day.clone(), false),
            ("date", "ne2013-01-15", day.clone(), true),
            ("date", "ne2013-01-14T10:00", day.clone(), true),
            ("date", "ne2013", from_2013.clone(), true),
            // gt: the value runs past the query's end.
            ("date", "gt2013-01-13", day.clone(), true),
            ("date", "gt2013-01-14", day.clone(), false),
            ("date", "gt2013-01-14T09:59", instant.clone(), true),
            ("date", "gt2020", from_2013.clone(), true),
            ("date", "gt2013", until_mid_2013.clone(), false),
            // lt: the value starts before the query's start.
            ("date", "lt2013-01-15", day.clone(), true),
            ("date", "lt2013-01-14", day.clone(), false),
            ("date", "lt1900", until_mid_2013.clone(), true),
            ("date", "lt2012", from_2013.clone(), false),
            // ge: gt or eq (R4's prefix table); a value straddling the query's start is neither.
            ("date", "ge2013-01-14", day.clone(), true),
            ("date", "ge2013-01-13", day.clone(), true),
            ("date", "ge2013-01-15", day.clone(), false),
            ("date", "ge2013-01-14T23:59", day.clone(), false),
            ("date", "ge2013", straddling_2013.clone(), false),
            ("date", "ge2012", straddling_2013.clone(), true),
            ("date", "ge2013-06-02", straddling_2013.clone(), false),
            // le: lt or eq.
            ("date", "le2013-01-14", day.clone(), true),
            ("date", "le2013-01-15", day.clone(), true),
            ("date", "le2013-01-13", day.clone(), false),
            ("date", "le2013-01-14T00:00", day.clone(), false),
            ("date", "le2012-06", straddling_2013.clone(), false),
            ("date", "le2013", straddling_2013.clone(), true),
            // sa and eb: wholly after or before the query's range.
            ("date", "sa2013-01-13", day.clone(), true),
            ("date", "sa2013-01-14", day.clone(), false),
            ("date", "sa2012", from_2013.clone(), true),
            ("date", "sa2012", straddling_2013.clone(), false),
            ("date", "eb2013-01-15", day.clone(), true),
            ("date", "eb2013-01-14", day.clone(), false),
            ("date", "eb2013-06-02", until_mid_2013.clone(), true),
            ("date", "eb2013-06-01", until_mid_2013, false),
            ("date", "ap2013-01-14", day.clone(), true),
            ("date", "2013-01-14", string("2013-01-14"), false),
        ]);
    }

    #[test]
    fn approximate_dates_widen_by_a_tenth_of_the_distance_from_now() {
        let (query_low, query_high) = range("2013");
        let ten_years_later = || range("2023-01-01").0;
        let fits = |value: &str, now: &dyn Fn() -> i64| {
            date_fits(Prefix::Ap, (query_low, query_high), range(value), now)
        };
        // Ten years from now to the query: about a year either side.
        assert!(fits("2012-03", &ten_years_later));
        assert!(fits("2014-10", &ten_years_later));
        assert!(!fits("2011-11", &ten_years_later));
        assert!(!fits("2015-02", &ten_years_later));
        // Now at the query's start: the range itself.
        let at_start = || query_low;
        assert!(fits("2013-12-31", &at_start));
        assert!(!fits("2012-12-31", &at_start));
        assert!(!fits("2014-01-01", &at_start));
        // Open ends do not overflow.
        assert!(date_fits(
            Prefix::Ap,
            (query_low, query_high),
            (i64::MIN, i64::MAX),
            || i64::MAX
        ));
        assert!(!date_fits(
            Prefix::Ap,
            (i64::MAX - 10, i64::MAX),
            (i64::MIN, i64::MIN + 10),
            || i64::MIN
        ));
    }

    #[test]
    fn numbers_compare_with_every_prefix() {
        check_table(&[
            ("number", "100", number("100"), true),
            ("number", "100", number("100.4"), true),
            ("number", "100", number("99.5"), true),
            ("number", "100", number("100.5"), false),
            ("number", "100", number("99.49"), false),
            ("number", "100.0", number("100.05"), false),
            ("number", "100.0", number("100.04"), true),
            ("number", "1e2", number("140"), true),
            ("number", "-5", number("-5.2"), true),
            ("number", "eq100", number("100"), true),
            ("number", "ne100", number("100"), false),
            ("number", "ne100", number("101"), true),
            ("number", "gt100", number("100.1"), true),
            ("number", "gt100", number("100"), false),
            ("number", "lt100", number("99.9"), true),
            ("number", "lt100", number("100"), false),
            ("number", "ge100", number("100"), true),
            ("number", "ge100", number("99.9"), false),
            ("number", "le100", number("100"), true),
            ("number", "le100", number("100.1"), false),
            ("number", "sa100", number("101"), true),
            ("number", "sa100", number("100"), false),
            ("number", "eb100", number("99"), true),
            ("number", "eb100", number("100"), false),
            ("number", "ap100", number("109"), true),
            ("number", "ap100", number("110"), true),
            ("number", "ap100", number("111"), false),
            ("number", "ap100", number("91"), true),
            ("number", "ap100", number("89"), false),
            ("number", "ap-100", number("-95"), true),
            ("number", "ap0", number("0.3"), true),
            ("number", "ap0", number("1"), false),
            (
                "number",
                "100",
                quantity("100", Some(UCUM), Some("mg"), None),
                true,
            ),
            ("number", "100", string("100"), false),
        ]);
    }

    #[test]
    fn quantities_compare_numbers_and_units() {
        let milligrams = quantity("5.4", Some(UCUM), Some("mg"), Some("milligram"));
        let unitless = number("5.4");
        let euros = quantity("10", Some("urn:iso:std:iso:4217"), Some("EUR"), None);
        check_table(&[
            ("quantity", "5.4", milligrams.clone(), true),
            (
                "quantity",
                "5.4|http://unitsofmeasure.org|mg",
                milligrams.clone(),
                true,
            ),
            ("quantity", "5.4||mg", milligrams.clone(), true),
            ("quantity", "5.4||milligram", milligrams.clone(), true),
            (
                "quantity",
                "5.4|http://unitsofmeasure.org|milligram",
                milligrams.clone(),
                false,
            ),
            (
                "quantity",
                "5.4|http://unitsofmeasure.org|g",
                milligrams.clone(),
                false,
            ),
            (
                "quantity",
                "5.4|http://other.org|mg",
                milligrams.clone(),
                false,
            ),
            (
                "quantity",
                "5.4|http://unitsofmeasure.org|",
                milligrams.clone(),
                true,
            ),
            ("quantity", "5.4||MG", milligrams.clone(), false),
            // No unit conversion.
            ("quantity", "5400||ug", milligrams.clone(), false),
            ("quantity", "0.0054||g", milligrams.clone(), false),
            ("quantity", "5.45||mg", milligrams.clone(), false),
            ("quantity", "5||mg", milligrams.clone(), true),
            ("quantity", "ne5.4||mg", milligrams.clone(), false),
            (
                "quantity",
                "gt5|http://unitsofmeasure.org|mg",
                milligrams.clone(),
                true,
            ),
            ("quantity", "gt5.4||mg", milligrams.clone(), false),
            ("quantity", "lt5.4||mg", milligrams.clone(), false),
            ("quantity", "lt5.5||mg", milligrams.clone(), true),
            ("quantity", "ge5.4||mg", milligrams.clone(), true),
            ("quantity", "le5.4||mg", milligrams.clone(), true),
            ("quantity", "le5.3||mg", milligrams.clone(), false),
            ("quantity", "sa5||mg", milligrams.clone(), true),
            ("quantity", "eb5||mg", milligrams.clone(), false),
            ("quantity", "ap5||mg", milligrams.clone(), true),
            ("quantity", "ap4.9||mg", milligrams.clone(), false),
            ("quantity", "5.4||mg", unitless.clone(), false),
            ("quantity", "5.4", unitless, true),
            (
                "quantity",
                "10|urn:iso:std:iso:4217|EUR",
                euros.clone(),
                true,
            ),
            ("quantity", "10|urn:iso:std:iso:4217|USD", euros, false),
        ]);
    }

    #[test]
    fn uris_match_exactly_below_or_above() {
        let value_set = uri("http://acme.org/fhir/ValueSet/123");
        check_table(&[
            (
                "uri",
                "http://acme.org/fhir/ValueSet/123",
                value_set.clone(),
                true,
            ),
            (
                "uri",
                "http://acme.org/fhir/ValueSet/12",
                value_set.clone(),
                false,
            ),
            (
                "uri",
                "HTTP://acme.org/fhir/ValueSet/123",
                value_set.clone(),
                false,
            ),
            ("uri", "%", value_set.clone(), false),
            (
                "uri:below",
                "http://acme.org/fhir/",
                value_set.clone(),
                true,
            ),
            (
                "uri:below",
                "http://acme.org/fhir/ValueSet/123",
                value_set.clone(),
                true,
            ),
            (
                "uri:below",
                "http://acme.org/fhir/ValueSet/1234",
                value_set.clone(),
                false,
            ),
            ("uri:below", "http://other.org/", value_set.clone(), false),
            (
                "uri:above",
                "http://acme.org/fhir/ValueSet/123/_history/5",
                value_set.clone(),
                true,
            ),
            (
                "uri:above",
                "http://acme.org/fhir/ValueSet/123",
                value_set.clone(),
                true,
            ),
            ("uri:above", "http://acme.org/", value_set.clone(), false),
            ("uri:above", "http://acme.org/", uri(""), false),
            (
                "uri",
                "http://acme.org/fhir/ValueSet/123",
                string("http://acme.org/fhir/ValueSet/123"),
                false,
            ),
        ]);
    }

    #[test]
    fn composites_match_node_by_node() {
        let Criterion::Plain {
            values: alternatives,
            ..
        } = criterion(
            "composite",
            "http://loinc.org|8480-6$gt120|http://unitsofmeasure.org|mm[Hg]",
        )
        else {
            panic!("not plain");
        };
        let [QueryValue::Composite(query)] = alternatives.as_slice() else {
            panic!("{alternatives:?}");
        };
        let types = [SearchType::Token, SearchType::Quantity];
        let systolic = vec![token(Some(LOINC), Some("8480-6"), None)];
        let diastolic = vec![token(Some(LOINC), Some("8462-4"), None)];
        let high = vec![quantity("130", Some(UCUM), Some("mm[Hg]"), None)];
        let normal = vec![quantity("110", Some(UCUM), Some("mm[Hg]"), None)];
        assert!(composite_matches(
            query,
            &types,
            &[systolic.clone(), high.clone()]
        ));
        assert!(!composite_matches(
            query,
            &types,
            &[systolic.clone(), normal.clone()]
        ));
        assert!(!composite_matches(
            query,
            &types,
            &[diastolic.clone(), high.clone()]
        ));
        let both_codes = [diastolic, systolic.clone()].concat();
        assert!(composite_matches(
            query,
            &types,
            &[both_codes, high.clone()]
        ));
        assert!(!composite_matches(
            query,
            &types,
            &[systolic.clone(), vec![]]
        ));
        assert!(!composite_matches(
            query,
            &types,
            std::slice::from_ref(&systolic)
        ));
        assert!(!composite_matches(
            query,
            &types[..1],
            &[systolic.clone(), high.clone()]
        ));
        assert!(!composite_matches(&[], &[], &[]));
        // A composite never matches flat values.
        let whole = criterion("composite", "8480-6$130");
        assert!(!matches(&whole, &[systolic[0].clone(), high[0].clone()]));
        assert!(!value_matches(
            SearchType::Composite,
            None,
            &alternatives[0],
            &systolic[0]
        ));
    }

    #[test]
    fn chains_and_has_never_match_here() {
        let inner = criterion("string", "x");
        let chain = Criterion::Chain {
            resource_type: "Test".to_owned(),
            code: "reference".to_owned(),
            target_types: vec!["Patient".to_owned()],
            inner: Box::new(inner.clone()),
        };
        let has = Criterion::Has {
            resource_type: "Test".to_owned(),
            source_type: "Test".to_owned(),
            reference_code: "reference".to_owned(),
            inner: Box::new(inner),
        };
        for criterion in [chain, has] {
            assert!(!matches(&criterion, &[string("x")]));
            assert!(!matches(&criterion, &[]));
        }
    }

    #[test]
    fn modifiers_foreign_to_a_type_match_nothing() {
        let text = QueryValue::String("x".to_owned());
        assert!(!value_matches(
            SearchType::String,
            Some(&Modifier::Below),
            &text,
            &string("x")
        ));
        let code = QueryValue::Token {
            system: TokenSystem::Any,
            code: Some("x".to_owned()),
        };
        assert!(!value_matches(
            SearchType::Token,
            Some(&Modifier::Exact),
            &code,
            &token(None, Some("x"), None)
        ));
        assert!(!value_matches(
            SearchType::Token,
            None,
            &QueryValue::Token {
                system: TokenSystem::Any,
                code: None
            },
            &token(None, Some("x"), None)
        ));
        assert!(!value_matches(
            SearchType::Uri,
            Some(&Modifier::Contains),
            &QueryValue::Uri("x".to_owned()),
            &uri("x")
        ));
        assert!(!value_matches(
            SearchType::Special,
            None,
            &text,
            &string("x")
        ));
    }
}
