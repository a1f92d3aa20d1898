//! Fuzzing harnesses: one function per fuzz target of `tests/fuzz/` (run with
//! `cargo fuzz run --fuzz-dir tests/fuzz <target>`, or `scripts/fuzz` for all of them).
//!
//! Each harness takes arbitrary bytes, drives the code that reads untrusted input, and asserts
//! what must hold for every input, so that the fuzzer finds wrong answers as well as panics,
//! hangs and runaway recursion:
//! - [`resource_json`]: request bodies (JSON, or XML when the body starts with `<`) through
//!   [`parse_resource`](crate::fhir::parse::parse_resource) and what the write path does next;
//! - [`search_query`]: search query strings through [`query::parse`] with the real registry,
//!   the value parsers, and the matcher against fixed resources;
//! - [`smart_scopes`]: token `scope` strings through [`Scopes::parse`] and `grant`;
//! - [`fhirpath`]: the FHIRPath subset, parsed and evaluated on fixed resources;
//! - [`bundle_references`]: a transaction Bundle's `fullUrl` resolution and reference
//!   rewriting.
//!
//! The fuzz targets are one-line calls to these functions, and the unit tests below run every
//! seed and every kept crash (`tests/fuzz/seeds/<target>/`, `tests/fuzz/regressions/<target>/`)
//! through the same functions. Definition data comes from this crate's own `fhir-profiles/`,
//! loaded once per process.
//!
//! # The canary
//! Error messages and ignore reasons reach logs and OperationOutcomes, so they must never repeat
//! a value from the request (values can be PHI). Harnesses check this with a marker: when an
//! input value contains [`CANARY`] and no element or parameter name does, no message may
//! contain it. The seeds carry the marker in a few values, so the fuzzer moves it around.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::authz::scopes::{Permission, ResourceScope, ScopeContext, ScopeGrant, Scopes};
use crate::error::ApiError;
use crate::fhir::compartment::PatientCompartment;
use crate::fhir::format::Format;
use crate::fhir::parse::parse_resource;
use crate::fhir::validate::Validator;
use crate::search::fhirpath::Expression;
use crate::search::index::{self, Blinder};
use crate::search::query::{self, Criterion, QueryValue};
use crate::search::registry::Registry;
use crate::search::{matcher, values};

/// A marker that stands for PHI in fuzz inputs (see the module docs).
pub const CANARY: &str = "CANARY";

/// The public base URL the bundle harness assumes (absolute request URLs under it are local).
const BASE_URL: &str = "https://fhir.example.org/r4";

/// Definition data, loaded once.
struct Profiles {
    validator: Validator,
    registry: Registry,
    compartment: PatientCompartment,
    blinder: Blinder,
}

fn profiles() -> &'static Profiles {
    static PROFILES: OnceLock<Profiles> = OnceLock::new();
    PROFILES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir-profiles");
        let validator = Validator::load(&dir).expect("fhir-profiles/ has the element definitions");
        let compartment =
            PatientCompartment::load(&dir).expect("fhir-profiles/ has the patient compartment");
        let registry = Registry::load(&dir, |name| compartment.is_compartment_type(name))
            .expect("fhir-profiles/ has the search parameters");
        Profiles {
            validator,
            registry,
            compartment,
            blinder: Blinder::new(&[7; 32]),
        }
    })
}

/// Resources the search and FHIRPath harnesses evaluate on: small, but with a value for most
/// kinds of search parameter (token, string, date, quantity, reference, composite, contained).
fn fixed_resources() -> &'static [Value] {
    static RESOURCES: OnceLock<Vec<Value>> = OnceLock::new();
    RESOURCES.get_or_init(|| {
        vec![
            json!({
                "resourceType": "Patient",
                "id": "p1",
                "meta": {
                    "versionId": "1",
                    "lastUpdated": "2024-01-02T03:04:05Z",
                    "tag": [{"system": "http://example.org/tags", "code": "t1"}]
                },
                "contained": [{"resourceType": "Organization", "id": "o2", "name": "Org"}],
                "extension": [{"url": "http://example.org/ext", "valueString": "x"}],
                "identifier": [{
                    "type": {"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                        "code": "MR"
                    }]},
                    "system": "http://example.org/mrn",
                    "value": "12345"
                }],
                "active": true,
                "name": [
                    {"family": "Chalmers", "given": ["Peter", "James"]},
                    {"use": "nickname", "given": ["Jim"]}
                ],
                "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}],
                "gender": "male",
                "birthDate": "1974-12-25",
                "address": [{"city": "Springfield", "postalCode": "3999", "country": "AU"}],
                "generalPractitioner": [{"reference": "Practitioner/pr1"}],
                "managingOrganization": {"reference": "#o2"},
                "link": [{"other": {"reference": "Patient/p2"}, "type": "seealso"}]
            }),
            json!({
                "resourceType": "Observation",
                "id": "o1",
                "status": "final",
                "category": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs"
                }]}],
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": "85354-9"}],
                    "text": "Blood pressure"
                },
                "subject": {"reference": "Patient/p1"},
                "encounter": {"reference": "https://fhir.example.org/r4/Encounter/e1/_history/2"},
                "effectiveDateTime": "2024-05-06T07:08:09+02:00",
                "issued": "2024-05-06T07:08:09.123Z",
                "valueQuantity": {
                    "value": 120.5,
                    "unit": "mmHg",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]"
                },
                "component": [
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                        "valueQuantity": {
                            "value": 107,
                            "system": "http://unitsofmeasure.org",
                            "code": "mm[Hg]"
                        }
                    },
                    {
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                        "valueQuantity": {
                            "value": 6.0e1,
                            "system": "http://unitsofmeasure.org",
                            "code": "mm[Hg]"
                        }
                    }
                ],
                "referenceRange": [{"low": {"value": 90}, "high": {"value": 140}}]
            }),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Resource bodies
// ---------------------------------------------------------------------------------------------

/// A request body (XML when its first non-blank byte is `<`, else JSON) through strict parsing
/// and the steps a create takes before the database: stamping, the patient compartment, the
/// Consent checks and the search index.
///
/// Asserts: a rejection names no value; an accepted resource re-parses to itself from its
/// stored JSON, converts to XML and back (the XML read path) to the same resource, and stays
/// valid once stamped; its compartment is a valid id; its index rows are bounded ranges and
/// short terms, and identifying parameters keep blinded terms only.
pub fn resource_json(data: &[u8]) {
    let profiles = profiles();
    let format = match data.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'<') => Format::Xml,
        _ => Format::Json,
    };
    let resource = match parse_resource(data, format, &profiles.validator) {
        Ok(resource) => resource,
        Err(error) => {
            if format == Format::Json {
                assert_rejection_keeps_values(data, &error);
            }
            return;
        }
    };
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .expect("an accepted resource has a resourceType")
        .to_owned();
    assert!(fhir_codec::is_resource_type(&resource_type));

    let json = serde_json::to_vec(&resource).expect("a JSON map serializes");
    let reparsed = parse_resource(&json, Format::Json, &profiles.validator)
        .unwrap_or_else(|error| panic!("an accepted resource fails to re-parse: {error:?}"));
    assert_eq!(reparsed, resource, "JSON round trip changed the resource");

    let xml = fhir_codec::json_to_xml(&json)
        .unwrap_or_else(|error| panic!("an accepted resource has no XML form: {error}"));
    let from_xml = parse_resource(&xml, Format::Xml, &profiles.validator)
        .unwrap_or_else(|error| panic!("the XML form of an accepted resource fails: {error:?}"));
    assert_eq!(
        without_narrative_whitespace(Value::Object(from_xml)),
        without_narrative_whitespace(Value::Object(resource.clone())),
        "the XML round trip changed the resource"
    );

    let value = Value::Object(resource.clone());
    if resource_type == "Consent" && crate::consent::validate(&value).is_empty() {
        let _ = crate::consent::Directive::compile("fuzz", 1, &value);
    }
    if let Some(patient) = profiles
        .compartment
        .patient_of(&resource_type, "fuzz", &value)
    {
        assert!(
            crate::fhir::is_valid_id(&patient),
            "compartment id {patient:?}"
        );
    }
    let time = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_000).expect("a valid time");
    let stamped = crate::api::write::stamp(resource, "fuzz-1", 7, time);
    assert_eq!(stamped["id"], "fuzz-1");
    assert_eq!(stamped["meta"]["versionId"], "7");
    let stored = serde_json::to_vec(&stamped).expect("a JSON value serializes");
    if let Err(error) = parse_resource(&stored, Format::Json, &profiles.validator) {
        panic!("the stamped resource is invalid: {error:?}");
    }

    let rows = index::index_rows(
        &profiles.registry,
        &profiles.blinder,
        &resource_type,
        &stamped,
    );
    for (code, low, high) in &rows.dates {
        assert!(low < high, "date range of {code}: [{low}, {high})");
    }
    for (code, low, high) in &rows.numbers {
        assert!(
            !low.is_nan() && !high.is_nan() && low <= high,
            "number range of {code}: [{low}, {high})"
        );
    }
    for (code, term) in &rows.terms {
        assert!(
            term.chars().count() <= index::MAX_TERM_CHARS,
            "term of {code}"
        );
        let identifying = profiles
            .registry
            .get(&resource_type, code)
            .is_some_and(|definition| definition.identifying);
        if identifying {
            assert!(
                term == index::PRESENCE || is_blinded(term),
                "identifying {code} indexed in clear"
            );
        }
    }
    for (code, _, _) in &rows.dates {
        let identifying = profiles
            .registry
            .get(&resource_type, code)
            .is_some_and(|definition| definition.identifying);
        assert!(!identifying, "identifying date {code} indexed in clear");
    }
}

/// `value` with the whitespace of every narrative (`div`) removed: fhirbolt trims the text
/// nodes of XHTML when it reads or writes XML (and indents it when writing), so the XML round
/// trip keeps a narrative's markup and words but not its whitespace (a known limitation, see
/// tests/fuzz/README.md).
fn without_narrative_whitespace(mut value: Value) -> Value {
    let mut pending = vec![&mut value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items.iter_mut()),
            Value::Object(members) => {
                for (key, member) in members.iter_mut() {
                    match member {
                        Value::String(text) if key == "div" => {
                            text.retain(|c| !c.is_ascii_whitespace());
                        }
                        member => pending.push(member),
                    }
                }
            }
            _ => {}
        }
    }
    value
}

/// `h:` and 16 hex digits.
fn is_blinded(term: &str) -> bool {
    term.strip_prefix("h:")
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A rejected JSON body: when the canary is in a value and in no key, no issue repeats it.
fn assert_rejection_keeps_values(data: &[u8], error: &ApiError) {
    let Ok(document) = serde_json::from_slice::<Value>(data) else {
        // Malformed JSON: serde_json's messages describe the grammar, not the text.
        return;
    };
    if !json_has_canary_value(&document) {
        return;
    }
    let text = match error {
        ApiError::Invalid(issues) => issues
            .iter()
            .map(|issue| format!("{} @ {:?}", issue.message, issue.location))
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    };
    assert!(!text.contains(CANARY), "a value leaked into: {text}");
}

/// Whether a string value holds the canary while no key does.
fn json_has_canary_value(document: &Value) -> bool {
    let (mut in_key, mut in_value) = (false, false);
    let mut pending = vec![document];
    while let Some(value) = pending.pop() {
        match value {
            Value::String(text) => in_value |= text.contains(CANARY),
            Value::Array(items) => pending.extend(items),
            Value::Object(members) => {
                for (key, member) in members {
                    in_key |= key.contains(CANARY);
                    pending.push(member);
                }
            }
            _ => {}
        }
    }
    in_value && !in_key
}

// ---------------------------------------------------------------------------------------------
// Search queries
// ---------------------------------------------------------------------------------------------

/// A search: `Type?query` (an empty type is a system-level search; no `?` searches
/// Observation), parsed like a request's query string and then by the search parser with the
/// real registry; every plain criterion is matched against the fixed resources of its type.
/// Every value also goes through the value parsers on its own.
///
/// Asserts: the query string re-encodes to the same pairs and the same parse; criteria are
/// well-formed (alternatives present, ranges ordered and finite); no error or ignore reason
/// repeats a value; date ranges are ordered, decimals lie in their precision range, and escaped
/// splitting round-trips.
pub fn search_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (resource_type, query_string) = match text.split_once('?') {
        Some(("", query_string)) => (None, query_string),
        Some((resource_type, query_string)) => (Some(resource_type), query_string),
        None => (Some("Observation"), text),
    };
    let pairs = crate::api::QueryParams::parse(query_string).0;
    let registry = &profiles().registry;
    let parsed = query::parse(resource_type, &pairs, registry);

    let encoded = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&pairs)
        .finish();
    let decoded = crate::api::QueryParams::parse(&encoded).0;
    assert_eq!(decoded, pairs, "the query string does not re-encode");
    assert_eq!(
        query::parse(resource_type, &decoded, registry),
        parsed,
        "the same query parses differently"
    );

    let canary_in_names = pairs.iter().any(|(name, _)| name.contains(CANARY))
        || resource_type.is_some_and(|name| name.contains(CANARY));
    match &parsed {
        Err(error) => {
            if !canary_in_names {
                assert!(!error.to_string().contains(CANARY), "{error}");
            }
        }
        Ok(parsed) => {
            for ignored in &parsed.ignored {
                if !canary_in_names {
                    assert!(!ignored.reason.contains(CANARY), "{}", ignored.reason);
                }
            }
            for criterion in &parsed.criteria {
                check_criterion(criterion, 0);
                match_fixed_resources(registry, criterion);
            }
        }
    }

    for value in std::iter::once(text).chain(pairs.iter().map(|(_, value)| value.as_str())) {
        check_values(value);
    }
}

fn check_criterion(criterion: &Criterion, depth: usize) {
    assert!(
        depth <= query::MAX_NESTING,
        "chains nest deeper than allowed"
    );
    match criterion {
        Criterion::Plain { values, .. } => {
            assert!(!values.is_empty(), "a criterion without alternatives");
            for value in values {
                check_query_value(value);
            }
        }
        Criterion::Chain {
            target_types,
            inner,
            ..
        } => {
            assert!(!target_types.is_empty());
            check_criterion(inner, depth + 1);
        }
        Criterion::Has { inner, .. } => check_criterion(inner, depth + 1),
    }
}

fn check_query_value(value: &QueryValue) {
    match value {
        QueryValue::Date { low, high, .. } => assert!(low < high, "date [{low}, {high})"),
        QueryValue::Number {
            value, low, high, ..
        }
        | QueryValue::Quantity {
            value, low, high, ..
        } => assert!(
            low.is_finite() && high.is_finite() && low <= value && value <= high,
            "number {value} in [{low}, {high})"
        ),
        QueryValue::Composite(parts) => parts.iter().for_each(check_query_value),
        _ => {}
    }
}

/// Matches a plain criterion against the fixed resources of its type, as the engine's re-check
/// does (it must not panic; `:not` must be the negation of the plain match).
fn match_fixed_resources(registry: &Registry, criterion: &Criterion) {
    let Criterion::Plain {
        resource_type,
        code,
        ..
    } = criterion
    else {
        return;
    };
    let Some(definition) = registry.get(resource_type, code) else {
        return;
    };
    for resource in fixed_resources()
        .iter()
        .filter(|resource| resource["resourceType"] == resource_type.as_str())
    {
        if definition.search_type == values::SearchType::Composite {
            let _ = crate::search::engine::composite_passes(definition, criterion, resource);
            continue;
        }
        let found = values::extract(&definition.expression, definition.search_type, resource);
        let _ = matcher::matches(criterion, &found);
    }
}

/// The value parsers on one text.
fn check_values(text: &str) {
    if let Some((low, high)) = values::parse_date_range(text) {
        assert!(low < high, "date range [{low}, {high})");
    }
    if let Some((value, low, high)) = values::parse_decimal_range(text) {
        assert!(
            value.is_finite() && low.is_finite() && high.is_finite(),
            "decimal range not finite"
        );
        assert!(
            low <= value && value <= high,
            "{value} not in [{low}, {high})"
        );
    }
    for separator in [',', '|', '$'] {
        let pieces = query::split_escaped(text, separator);
        let joined = pieces
            .iter()
            .map(|piece| escape(piece))
            .collect::<Vec<_>>()
            .join(&separator.to_string());
        assert_eq!(
            query::split_escaped(&joined, separator),
            pieces,
            "escaping does not round-trip"
        );
    }
}

/// The inverse of the search value unescaping: a backslash before `,` `|` `$` `\`.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, ',' | '|' | '$' | '\\') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

// ---------------------------------------------------------------------------------------------
// SMART scopes
// ---------------------------------------------------------------------------------------------

/// A token's `scope` string through [`Scopes::parse`].
///
/// Asserts: reports are printable ASCII of bounded length; accepted resource scopes are
/// well-formed; the scopes rendered back to text parse to the same scopes; and adding scope
/// tokens never takes a grant away (the scopes of the first half of the tokens grant no more
/// than the scopes of all of them).
pub fn smart_scopes(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (scopes, rejected) = Scopes::parse(text);
    for report in &rejected {
        assert!(
            report.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "report not printable: {report:?}"
        );
        assert!(report.len() <= 256, "report of {} bytes", report.len());
    }
    for scope in &scopes.resources {
        assert!(!scope.permissions.is_empty());
        if let Some(name) = &scope.resource_type {
            assert!(name.len() >= 2 && name.bytes().all(|b| b.is_ascii_alphabetic()));
        }
        for (name, value) in &scope.constraints {
            assert!(!name.is_empty() && !value.is_empty());
        }
    }

    let rendered: Vec<String> = scopes
        .resources
        .iter()
        .map(render_scope)
        .chain(scopes.other.iter().cloned())
        .collect();
    let (again, again_rejected) = Scopes::parse(&rendered.join(" "));
    assert!(
        again_rejected.is_empty(),
        "rendered scopes rejected: {again_rejected:?}"
    );
    assert_eq!(again, scopes, "rendered scopes parse differently");

    let tokens: Vec<&str> = text.split(' ').filter(|token| !token.is_empty()).collect();
    let (fewer, _) = Scopes::parse(&tokens[..tokens.len() / 2].join(" "));
    let mut types: Vec<&str> = vec!["*", "Observation", "Patient", "patient", "Patient/1"];
    types.extend(
        scopes
            .resources
            .iter()
            .filter_map(|scope| scope.resource_type.as_deref()),
    );
    let contexts: [&[ScopeContext]; 4] = [
        &[ScopeContext::Patient],
        &[ScopeContext::User],
        &[ScopeContext::System],
        &[
            ScopeContext::Patient,
            ScopeContext::User,
            ScopeContext::System,
        ],
    ];
    for context in contexts {
        for resource_type in &types {
            for permission in [
                Permission::Create,
                Permission::Read,
                Permission::Update,
                Permission::Delete,
                Permission::Search,
            ] {
                let all = scopes.grant(context, resource_type, permission);
                let some = fewer.grant(context, resource_type, permission);
                assert!(
                    grant_covers(&all, &some),
                    "more scopes grant less: {some:?} then {all:?}"
                );
            }
        }
    }
}

/// A resource scope as text: v2 permission letters (`*` for all five when unconstrained, so
/// the text is never longer than the token it came from), constraints percent-encoded where
/// needed.
fn render_scope(scope: &ResourceScope) -> String {
    let context = match scope.context {
        ScopeContext::Patient => "patient",
        ScopeContext::User => "user",
        ScopeContext::System => "system",
    };
    let resource_type = scope.resource_type.as_deref().unwrap_or("*");
    let permissions = if scope.permissions.len() == 5 && scope.constraints.is_empty() {
        "*".to_string()
    } else {
        [
            (Permission::Create, 'c'),
            (Permission::Read, 'r'),
            (Permission::Update, 'u'),
            (Permission::Delete, 'd'),
            (Permission::Search, 's'),
        ]
        .iter()
        .filter(|(permission, _)| scope.permissions.contains(permission))
        .map(|(_, letter)| letter)
        .collect()
    };
    let mut text = format!("{context}/{resource_type}.{permissions}");
    for (position, (name, value)) in scope.constraints.iter().enumerate() {
        text.push(if position == 0 { '?' } else { '&' });
        text.push_str(&encode_constraint(name));
        text.push('=');
        text.push_str(&encode_constraint(value));
    }
    text
}

/// Form encoding that keeps every scope-token byte except the ones form decoding reads
/// (`%`, `+`, `&`); a space is `+`.
fn encode_constraint(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b' ' => encoded.push('+'),
            b'%' | b'+' | b'&' => encoded.push_str(&format!("%{byte:02X}")),
            0x21 | 0x23..=0x5B | 0x5D..=0x7E => encoded.push(char::from(byte)),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

/// Whether `wider` allows at least what `narrower` does.
fn grant_covers(wider: &ScopeGrant, narrower: &ScopeGrant) -> bool {
    match (wider, narrower) {
        (_, ScopeGrant::Denied) | (ScopeGrant::Unconstrained, _) => true,
        (ScopeGrant::Constrained(wide), ScopeGrant::Constrained(narrow)) => {
            narrow.iter().all(|set| wide.contains(set))
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// FHIRPath
// ---------------------------------------------------------------------------------------------

/// A FHIRPath expression parsed and evaluated on the fixed resources, from the resource and
/// from each member of its top-level arrays (as composite components are).
///
/// Asserts: every result is an element of the resource or a computed boolean (never a literal
/// or a `resolve()` placeholder), and evaluation is deterministic.
pub fn fhirpath(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let expression = match Expression::parse(text) {
        Ok(expression) => expression,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    for resource in fixed_resources() {
        let mut elements = HashSet::new();
        collect_addresses(resource, &mut elements);
        let check = |nodes: &[crate::search::fhirpath::Node<'_>]| {
            for node in nodes {
                assert!(
                    node.value.is_boolean() || elements.contains(&std::ptr::from_ref(node.value)),
                    "a result that is not an element of the resource: {}",
                    node.value
                );
                assert!(!node.value.is_array(), "an array in a result");
            }
        };
        let nodes = expression.evaluate(resource);
        check(&nodes);
        assert_eq!(expression.evaluate(resource), nodes);
        let members: Vec<crate::search::fhirpath::Node<'_>> = resource
            .as_object()
            .into_iter()
            .flat_map(|object| object.values())
            .filter_map(Value::as_array)
            .flatten()
            .map(|value| crate::search::fhirpath::Node {
                value,
                type_hint: None,
            })
            .collect();
        for member in &members {
            check(&expression.evaluate_from(resource, std::slice::from_ref(member)));
        }
    }
}

/// The address of every JSON value in `value`, itself included.
fn collect_addresses(value: &Value, addresses: &mut HashSet<*const Value>) {
    addresses.insert(std::ptr::from_ref(value));
    match value {
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_addresses(item, addresses)),
        Value::Object(members) => members
            .values()
            .for_each(|member| collect_addresses(member, addresses)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Transaction bundles
// ---------------------------------------------------------------------------------------------

/// A transaction Bundle (any JSON object) through the transaction's reference resolution,
/// without a database (see `api::bundle::resolve_offline`).
///
/// Asserts: each write entry's `fullUrl` resolves to what that entry writes; rewriting changes
/// `reference` strings only, each to what its old value resolves to; and no reference to a
/// resolved `urn:uuid:`/`urn:oid:` `fullUrl` remains.
pub fn bundle_references(data: &[u8]) {
    let Ok(Value::Object(bundle)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(resolution) = crate::api::bundle::resolve_offline(BASE_URL, &bundle) else {
        return;
    };
    for (full_url, target) in &resolution.full_urls {
        assert_eq!(
            resolution.references.get(full_url),
            Some(target),
            "fullUrl {full_url} resolves to another entry's resource"
        );
    }
    for (original, rewritten) in &resolution.resources {
        match (original, rewritten) {
            (None, None) => {}
            (Some(original), Some(rewritten)) => {
                assert_rewritten(original, rewritten, &resolution.references);
                let mut references = Vec::new();
                collect_references(rewritten, &mut references);
                for reference in references {
                    let local =
                        reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:");
                    assert!(
                        !(local && resolution.references.contains_key(reference)),
                        "{reference} left unresolved"
                    );
                }
            }
            _ => panic!("an entry's resource appeared or vanished"),
        }
    }
}

/// `rewritten` is `original` with every `reference` string replaced by what it resolves to.
fn assert_rewritten(
    original: &Map<String, Value>,
    rewritten: &Map<String, Value>,
    resolved: &HashMap<String, String>,
) {
    assert!(
        original.keys().eq(rewritten.keys()),
        "rewriting changed the elements"
    );
    for ((key, before), after) in original.iter().zip(rewritten.values()) {
        match (before, after) {
            (Value::String(before), Value::String(after)) if key == "reference" => {
                let expected = resolved.get(before).unwrap_or(before);
                assert_eq!(after, expected, "reference {before} rewritten wrongly");
            }
            (Value::Object(before), Value::Object(after)) => {
                assert_rewritten(before, after, resolved);
            }
            (Value::Array(before), Value::Array(after)) => {
                assert_eq!(before.len(), after.len());
                for (before, after) in before.iter().zip(after) {
                    match (before, after) {
                        (Value::Object(before), Value::Object(after)) => {
                            assert_rewritten(before, after, resolved);
                        }
                        // FHIR JSON has no arrays of arrays, and nothing else holds references.
                        _ => assert_eq!(before, after),
                    }
                }
            }
            _ => assert_eq!(before, after, "rewriting changed {key}"),
        }
    }
}

/// Every `reference` string in a resource, as the rewriting finds them.
fn collect_references<'v>(object: &'v Map<String, Value>, found: &mut Vec<&'v str>) {
    for (key, value) in object {
        match value {
            Value::String(text) if key == "reference" => found.push(text),
            Value::Object(child) => collect_references(child, found),
            Value::Array(items) => {
                for item in items.iter().filter_map(Value::as_object) {
                    collect_references(item, found);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// A fuzz target's harness.
    type Harness = fn(&[u8]);

    /// Each target with its harness.
    const TARGETS: [(&str, Harness); 5] = [
        ("resource_json", super::resource_json),
        ("search_query", super::search_query),
        ("smart_scopes", super::smart_scopes),
        ("fhirpath", super::fhirpath),
        ("bundle_references", super::bundle_references),
    ];

    /// The files of `tests/fuzz/<kind>/<target>/`, sorted (none when the folder is absent).
    fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz")
            .join(kind)
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| path.is_file())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Runs every file through its target's harness; a panic names the file.
    fn run_all(kind: &str) -> usize {
        let mut count = 0;
        for (target, harness) in TARGETS {
            for path in inputs(kind, target) {
                let data = std::fs::read(&path).expect("a readable input");
                if std::panic::catch_unwind(|| harness(&data)).is_err() {
                    panic!("{target} fails on {}", path.display());
                }
                count += 1;
            }
        }
        count
    }

    #[test]
    fn fuzzing_seeds_pass() {
        assert!(run_all("seeds") >= 5, "every target has seeds");
    }

    #[test]
    fn fuzzing_regressions_pass() {
        run_all("regressions");
    }

    #[test]
    fn every_target_has_seeds() {
        for (target, _) in TARGETS {
            assert!(!inputs("seeds", target).is_empty(), "no seeds for {target}");
        }
    }
}
