//! FHIR search (<http://hl7.org/fhir/R4/search.html>) through the real server.
//!
//! - An oracle: random Patients and Observations with deliberately overlapping values, and random
//!   queries from a grammar (parameter × modifier × prefix × OR-values × AND-repeats), each
//!   answered by the server over every page and by a brute-force evaluation of the R4 rules
//!   written here, independently of the server's code.
//! - Clinical queries over the Synthea bundles (`../shared/testdata`, not written by this
//!   project), with expectations computed from the bundles themselves.
//! - Metacharacters matching literally, unknown and malformed parameters, paging while the data
//!   changes, access control on matches, includes and totals, what the index stores, conditional
//!   interactions and index maintenance, POST equal to GET, and the common and result
//!   parameters.
//!
//! All values here are synthetic test data, so failure messages print queries and resources.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use chrono::{Datelike, FixedOffset};
use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{testdata_dir, TestApp, FHIR_JSON};

const UCUM: &str = "http://unitsofmeasure.org";
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const FORM: &str = "application/x-www-form-urlencoded";
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

// ---------------------------------------------------------------------------------------------
// Searching as a client does: every page, following `next` links verbatim.

/// Who sends a search: the suite's EHR system, or a caller with its own token.
#[derive(Clone, Copy)]
enum Caller<'t> {
    Ehr,
    Bearer(&'t str),
}

fn get_as(app: &TestApp, caller: Caller<'_>, url: &str) -> reqwest::RequestBuilder {
    match caller {
        Caller::Ehr => app.client.get(url),
        Caller::Bearer(token) => app.anonymous.get(url).bearer_auth(token),
    }
}

/// What a search returned over all of its pages.
#[derive(Debug, Default)]
struct Pages {
    /// `Type/id` of the `match` entries, in the order served.
    matches: Vec<String>,
    /// The resources of the `match` entries, in the same order.
    resources: Vec<Value>,
    /// `Type/id` of the `include` entries.
    includes: Vec<String>,
    /// The resources of the `outcome` entries.
    outcomes: Vec<Value>,
    /// `Bundle.total` of the first page.
    total: Option<u64>,
    /// The first page as served.
    first: Value,
    pages: usize,
}

impl Pages {
    fn match_set(&self) -> BTreeSet<String> {
        self.matches.iter().cloned().collect()
    }

    fn include_set(&self) -> BTreeSet<String> {
        self.includes.iter().cloned().collect()
    }
}

/// `Type/id` of a resource.
fn key(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or("?"),
        resource["id"].as_str().unwrap_or("?")
    )
}

/// A set of `Type/id` keys.
fn keys<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> BTreeSet<String> {
    items
        .into_iter()
        .map(|item| item.as_ref().to_string())
        .collect()
}

/// The URL of one of a Bundle's links.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == relation)?["url"]
        .as_str()
        .map(str::to_string)
}

/// Percent-encodes one query value.
fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A query string from `(name, value)` pairs.
fn encode(pairs: &[(String, String)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

/// Adds one served page to `pages`.
fn read_page(pages: &mut Pages, bundle: &Value, label: &str) -> Result<(), String> {
    if bundle["resourceType"] != "Bundle" || bundle["type"] != "searchset" {
        return Err(format!("{label}: not a searchset Bundle: {bundle}"));
    }
    if pages.pages == 0 {
        pages.total = bundle["total"].as_u64();
        pages.first = bundle.clone();
    }
    pages.pages += 1;
    for entry in bundle["entry"].as_array().into_iter().flatten() {
        let resource = &entry["resource"];
        match entry["search"]["mode"].as_str() {
            Some("outcome") => pages.outcomes.push(resource.clone()),
            Some(mode @ ("match" | "include")) => {
                let key = key(resource);
                let full_url = entry["fullUrl"].as_str().unwrap_or_default();
                if !full_url.ends_with(&format!("/{key}")) {
                    return Err(format!("{label}: fullUrl {full_url:?} for {key}"));
                }
                if mode == "match" {
                    pages.matches.push(key);
                    pages.resources.push(resource.clone());
                } else {
                    pages.includes.push(key);
                }
            }
            other => return Err(format!("{label}: an entry with search.mode {other:?}")),
        }
    }
    Ok(())
}

/// Reads `first` and every page its `next` links lead to.
async fn follow(
    app: &TestApp,
    caller: Caller<'_>,
    label: &str,
    first: Value,
) -> Result<Pages, String> {
    let mut pages = Pages::default();
    let mut bundle = first;
    loop {
        read_page(&mut pages, &bundle, label)?;
        let Some(next) = link(&bundle, "next") else {
            return Ok(pages);
        };
        if pages.pages >= 500 {
            return Err(format!("{label}: more than 500 pages"));
        }
        let response = get_as(app, caller, &next)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|error| error.to_string())?;
        if status != 200 {
            return Err(format!(
                "{label}: page {} ({next}): {status}: {text}",
                pages.pages + 1
            ));
        }
        bundle = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    }
}

/// GETs a search and all of its pages; the error says which page was refused and how.
async fn try_search_as(app: &TestApp, caller: Caller<'_>, path: &str) -> Result<Pages, String> {
    let response = get_as(app, caller, &app.url(path))
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let text = response.text().await.map_err(|error| error.to_string())?;
    if status != 200 {
        return Err(format!("GET {path}: {status}: {text}"));
    }
    let first = serde_json::from_str(&text).map_err(|error| error.to_string())?;
    follow(app, caller, path, first).await
}

async fn search(app: &TestApp, path: &str) -> Pages {
    try_search_as(app, Caller::Ehr, path)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

async fn search_as(app: &TestApp, token: &str, path: &str) -> Pages {
    try_search_as(app, Caller::Bearer(token), path)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// POSTs a search form to `path` (`Patient/_search`, `_search`) and reads every page.
async fn search_post(app: &TestApp, path: &str, form: &str) -> Pages {
    let response = app
        .client
        .post(app.url(path))
        .header("content-type", FORM)
        .body(form.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "POST {path} {form}: {text}");
    follow(
        app,
        Caller::Ehr,
        &format!("POST {path} {form}"),
        serde_json::from_str(&text).unwrap(),
    )
    .await
    .unwrap_or_else(|error| panic!("{error}"))
}

/// Asserts that a search matches exactly `expected` (`Type/id` keys), each once.
async fn expect_matches(app: &TestApp, path: &str, expected: &BTreeSet<String>) -> Pages {
    let pages = search(app, path).await;
    let got = pages.match_set();
    assert_eq!(
        got.len(),
        pages.matches.len(),
        "GET {path}: a resource matched twice: {:?}",
        pages.matches
    );
    assert_eq!(
        &got,
        expected,
        "GET {path}\n  missing: {:?}\n  unexpected: {:?}",
        expected.difference(&got).collect::<Vec<_>>(),
        got.difference(expected).collect::<Vec<_>>()
    );
    pages
}

// ---------------------------------------------------------------------------------------------
// The R4 rules, written independently of the server.

/// Case and accent folding for string search ("case- and accent-insensitive"), for the letters
/// the test data uses.
fn fold(text: &str) -> String {
    text.chars()
        .flat_map(char::to_lowercase)
        .map(|character| match character {
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' => 'a',
            'ç' => 'c',
            'è' | 'é' | 'ê' | 'ë' => 'e',
            'ì' | 'í' | 'î' | 'ï' => 'i',
            'ñ' => 'n',
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' => 'o',
            'ù' | 'ú' | 'û' | 'ü' => 'u',
            'ý' | 'ÿ' => 'y',
            other => other,
        })
        .collect()
}

/// String search: starts-with, ignoring case and accents; `:exact` compares as written.
fn string_matches(target: &str, query: &str, exact: bool) -> bool {
    if exact {
        target == query
    } else {
        fold(target).starts_with(&fold(query))
    }
}

/// Escapes the characters that separate parts of a search value (`\`, `,`, `|`, `$`).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace('|', "\\|")
        .replace('$', "\\$")
}

/// Midnight UTC of a date, in seconds since the epoch.
fn ymd(year: i32, month: u32, day: u32) -> i64 {
    chrono::NaiveDate::from_ymd_opt(year, month, day)
        .unwrap_or_else(|| panic!("{year}-{month}-{day}"))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp()
}

/// The range `[low, high)` in seconds since the epoch (UTC) that a date, dateTime or instant
/// covers at its precision: `1950` is the whole year, a dateTime to the second one second.
/// Values without a time zone are taken as UTC (the server's documented choice, and what the
/// specification's "server local time" is on a server running in UTC).
fn date_range(text: &str) -> (i64, i64) {
    if text.len() > 10 {
        let instant = chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|error| panic!("{text}: {error}"))
            .timestamp();
        return (instant, instant + 1);
    }
    let parts: Vec<i32> = text.split('-').map(|part| part.parse().unwrap()).collect();
    match parts[..] {
        [year] => (ymd(year, 1, 1), ymd(year + 1, 1, 1)),
        [year, month] => {
            let next = if month == 12 {
                ymd(year + 1, 1, 1)
            } else {
                ymd(year, month as u32 + 1, 1)
            };
            (ymd(year, month as u32, 1), next)
        }
        [year, month, day] => {
            let start = ymd(year, month as u32, day as u32);
            (start, start + 86_400)
        }
        _ => panic!("not a date: {text}"),
    }
}

/// A Period's range: from its start to the end of its end; open-ended without an end.
fn period_range(period: &Value) -> Option<(i64, i64)> {
    let low = date_range(period["start"].as_str()?).0;
    let high = period["end"]
        .as_str()
        .map_or(i64::MAX, |end| date_range(end).1);
    Some((low, high))
}

/// The comparison prefix of a date or quantity value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    None,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

impl Prefix {
    fn text(self) -> &'static str {
        match self {
            Prefix::None => "",
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
            Prefix::Sa => "sa",
            Prefix::Eb => "eb",
        }
    }
}

/// R4's prefix table for ranges: the search value's range `query` against the resource value's
/// range `target`, both half-open.
fn date_matches(prefix: Prefix, query: (i64, i64), target: (i64, i64)) -> bool {
    let ((query_low, query_high), (target_low, target_high)) = (query, target);
    let contains = query_low <= target_low && target_high <= query_high;
    match prefix {
        Prefix::None | Prefix::Eq => contains,
        Prefix::Ne => !contains,
        // "the range above the search value intersects the range of the target value"
        Prefix::Gt => target_high > query_high,
        Prefix::Lt => target_low < query_low,
        Prefix::Ge => target_high > query_high || contains,
        Prefix::Le => target_low < query_low || contains,
        // "does not overlap, and the range above the search value contains the target"
        Prefix::Sa => target_low >= query_high,
        Prefix::Eb => target_high <= query_low,
    }
}

/// A decimal's value in millionths and its number of decimals (the test's values have at most
/// three).
fn decimal(text: &str) -> (i64, u32) {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let decimals = fraction.len() as u32;
    assert!(decimals <= 5, "{text}");
    let scaled = format!("{whole}{fraction}").parse::<i64>().unwrap();
    (scaled * 10_i64.pow(6 - decimals), decimals)
}

/// R4 number and quantity comparison: without a prefix (or `eq`, `ne`) the search value stands
/// for the range its precision implies (`100` is `[99.5, 100.5)`, `100.00` is
/// `[99.995, 100.005)`); `gt`, `lt`, `ge`, `le` compare with the value exactly ("lt100: values
/// that are less than exactly 100").
fn quantity_matches(prefix: Prefix, query: &str, target: &str) -> bool {
    let ((query, decimals), (target, _)) = (decimal(query), decimal(target));
    let half = 10_i64.pow(6 - decimals) / 2;
    let within = query - half <= target && target < query + half;
    match prefix {
        Prefix::None | Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt => target > query,
        Prefix::Lt => target < query,
        Prefix::Ge => target >= query,
        Prefix::Le => target <= query,
        Prefix::Sa | Prefix::Eb => unreachable!("not generated for quantities"),
    }
}

/// A token search value.
#[derive(Debug, Clone)]
enum TokenQuery {
    /// `code`: in any system or none.
    Code(String),
    /// `|code`: only without a system.
    NoSystem(String),
    /// `system|code`.
    SystemCode(String, String),
    /// `system|`: any code of the system.
    System(String),
}

impl TokenQuery {
    fn random(rng: &mut Rng, systems: &[&str], codes: &[&str]) -> TokenQuery {
        let system = rng.pick(systems).to_string();
        let code = rng.pick(codes).to_string();
        match rng.below(8) {
            0..=2 => TokenQuery::Code(code),
            3..=5 => TokenQuery::SystemCode(system, code),
            6 => TokenQuery::NoSystem(code),
            _ => TokenQuery::System(system),
        }
    }

    fn text(&self) -> String {
        match self {
            TokenQuery::Code(code) => escape(code),
            TokenQuery::NoSystem(code) => format!("|{}", escape(code)),
            TokenQuery::SystemCode(system, code) => format!("{}|{}", escape(system), escape(code)),
            TokenQuery::System(system) => format!("{}|", escape(system)),
        }
    }

    fn matches(&self, system: Option<&str>, code: &str) -> bool {
        match self {
            TokenQuery::Code(wanted) => code == wanted,
            TokenQuery::NoSystem(wanted) => system.is_none() && code == wanted,
            TokenQuery::SystemCode(wanted_system, wanted) => {
                system == Some(wanted_system.as_str()) && code == wanted
            }
            TokenQuery::System(wanted_system) => system == Some(wanted_system.as_str()),
        }
    }
}

/// The units part of a quantity search value.
#[derive(Debug, Clone, Copy)]
enum Units {
    Any,
    /// `|system|code`.
    SystemCode(&'static str, &'static str),
    /// `||code`: the code or the human-readable unit.
    Code(&'static str),
}

impl Units {
    fn suffix(self) -> String {
        match self {
            Units::Any => String::new(),
            Units::SystemCode(system, code) => format!("|{system}|{}", escape(code)),
            Units::Code(code) => format!("||{}", escape(code)),
        }
    }

    fn matches(self, quantity: &QuantityModel) -> bool {
        match self {
            Units::Any => true,
            Units::SystemCode(system, code) => {
                quantity.system == Some(system) && quantity.code == Some(code)
            }
            Units::Code(code) => quantity.code == Some(code) || quantity.unit == Some(code),
        }
    }
}

/// A tiny xorshift generator: the oracle's data and queries are the same on every run (and on
/// both backends) for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut state = self.0;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        self.0 = state;
        state
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle's world: what the test created, as plain data.

/// Families that collide under case and accent folding, or differ only by a metacharacter.
const FAMILIES: &[&str] = &[
    "Müller",
    "MULLER",
    "Mueller",
    "Muller",
    "müller",
    "O'Brien",
    "OBrien",
    "Smith_Jones",
    "SmithXJones",
    "100%Pure",
    "100XPure",
    "García",
    "Garcia",
    "GARCÍA",
    "Ng",
    "Nguyen",
    "Kim,Lee",
    "Pipe|Line",
    "Dollar$Sign",
    "Back\\slash",
    "Zoë",
];
const GIVENS: &[&str] = &[
    "Anna", "ANNA", "Ánna", "Anne", "Åsa", "Asa", "José", "Jose", "Jo", "John", "JOHN", "Jon",
    "Chloé", "Chloe", "Zoë", "Zoe", "Élodie",
];
const GENDERS: &[&str] = &["male", "female", "other", "unknown"];
const BIRTH_YEARS: &[i32] = &[1948, 1949, 1950, 1951, 1952, 1980, 1981];
const IDENTIFIER_SYSTEMS: &[Option<&str>] = &[Some("urn:sys:a"), Some("urn:sys:b"), None];
const IDENTIFIER_VALUES: &[&str] = &["X1", "X10", "X2", "a,b", "a", "c|d", "e$f", "x\\y", "MRN-7"];
const CODE_SYSTEMS: &[Option<&str>] = &[Some(LOINC), Some(SNOMED), None];
const CODES: &[&str] = &["8480-6", "8462-4", "1000", "2000", "A1"];
const STATUSES: &[&str] = &["final", "preliminary", "amended", "cancelled"];
/// (system, code, unit) of the Observations' quantities; no two are comparable in UCUM, so
/// unit conversion cannot change a result.
const QUANTITY_UNITS: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
    (Some(UCUM), Some("mm[Hg]"), Some("mmHg")),
    (Some(UCUM), Some("kg"), Some("kg")),
    (Some(UCUM), Some("/min"), Some("beats/minute")),
    (None, None, Some("mmHg")),
    (Some("urn:units"), Some("kg"), Some("kilo")),
];
const UNIT_QUERIES: &[Units] = &[
    Units::SystemCode(UCUM, "mm[Hg]"),
    Units::SystemCode(UCUM, "kg"),
    Units::SystemCode(UCUM, "/min"),
    Units::SystemCode("urn:units", "kg"),
    Units::Code("mmHg"),
    Units::Code("kg"),
    Units::Code("mm[Hg]"),
];
const GROUP_REFERENCE: &str = "Group/grp-1";

#[derive(Debug, Clone)]
struct NameModel {
    family: Option<&'static str>,
    given: Vec<&'static str>,
}

#[derive(Debug, Clone)]
struct PatientModel {
    id: String,
    names: Vec<NameModel>,
    gender: Option<&'static str>,
    birth_date: Option<String>,
    identifiers: Vec<Coding>,
}

#[derive(Debug, Clone)]
enum Effective {
    Absent,
    DateTime(String),
    Period { start: String, end: Option<String> },
}

#[derive(Debug, Clone)]
struct QuantityModel {
    /// The decimal as written in the resource.
    value: String,
    system: Option<&'static str>,
    code: Option<&'static str>,
    unit: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct ObservationModel {
    id: String,
    status: &'static str,
    codings: Vec<Coding>,
    effective: Effective,
    quantity: Option<QuantityModel>,
    subject: Option<String>,
}

/// What the oracle compares: an id, and the resource for failure messages.
trait Model {
    fn id(&self) -> &str;
    fn json(&self) -> Value;
}

impl Model for PatientModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn json(&self) -> Value {
        let mut resource = json!({"resourceType": "Patient"});
        if !self.id.is_empty() {
            resource["id"] = json!(self.id);
        }
        if !self.names.is_empty() {
            let names: Vec<Value> = self
                .names
                .iter()
                .map(|name| {
                    let mut object = json!({});
                    if let Some(family) = name.family {
                        object["family"] = json!(family);
                    }
                    if !name.given.is_empty() {
                        object["given"] = json!(name.given);
                    }
                    object
                })
                .collect();
            resource["name"] = json!(names);
        }
        if let Some(gender) = self.gender {
            resource["gender"] = json!(gender);
        }
        if let Some(birth_date) = &self.birth_date {
            resource["birthDate"] = json!(birth_date);
        }
        if !self.identifiers.is_empty() {
            let identifiers: Vec<Value> = self
                .identifiers
                .iter()
                .map(|(system, value)| match system {
                    Some(system) => json!({"system": system, "value": value}),
                    None => json!({ "value": value }),
                })
                .collect();
            resource["identifier"] = json!(identifiers);
        }
        resource
    }
}

impl PatientModel {
    /// The strings a string parameter (`name`, `family`, `given`) sees.
    fn strings(&self, code: &str) -> Vec<&'static str> {
        let mut strings = Vec::new();
        for name in &self.names {
            if code != "given" {
                strings.extend(name.family);
            }
            if code != "family" {
                strings.extend(name.given.iter().copied());
            }
        }
        strings
    }
}

impl Effective {
    fn range(&self) -> Option<(i64, i64)> {
        match self {
            Effective::Absent => None,
            Effective::DateTime(text) => Some(date_range(text)),
            Effective::Period { start, end } => Some((
                date_range(start).0,
                end.as_deref().map_or(i64::MAX, |end| date_range(end).1),
            )),
        }
    }
}

impl Model for ObservationModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn json(&self) -> Value {
        let coding: Vec<Value> = self
            .codings
            .iter()
            .map(|(system, code)| match system {
                Some(system) => json!({"system": system, "code": code}),
                None => json!({ "code": code }),
            })
            .collect();
        let mut resource = json!({
            "resourceType": "Observation",
            "status": self.status,
            "code": {"coding": coding}
        });
        if !self.id.is_empty() {
            resource["id"] = json!(self.id);
        }
        match &self.effective {
            Effective::Absent => {}
            Effective::DateTime(text) => resource["effectiveDateTime"] = json!(text),
            Effective::Period { start, end } => {
                let mut period = json!({ "start": start });
                if let Some(end) = end {
                    period["end"] = json!(end);
                }
                resource["effectivePeriod"] = period;
            }
        }
        if let Some(quantity) = &self.quantity {
            // Parsed from its text so that the JSON number keeps the written precision.
            let value: Value = serde_json::from_str(&quantity.value).unwrap();
            let mut object = json!({ "value": value });
            if let Some(unit) = quantity.unit {
                object["unit"] = json!(unit);
            }
            if let Some(system) = quantity.system {
                object["system"] = json!(system);
            }
            if let Some(code) = quantity.code {
                object["code"] = json!(code);
            }
            resource["valueQuantity"] = object;
        }
        if let Some(subject) = &self.subject {
            resource["subject"] = json!({ "reference": subject });
        }
        resource
    }
}

struct World {
    patients: Vec<PatientModel>,
    observations: Vec<ObservationModel>,
    patient_index: HashMap<String, usize>,
}

impl World {
    fn patient(&self, id: &str) -> Option<&PatientModel> {
        self.patient_index
            .get(id)
            .map(|&index| &self.patients[index])
    }

    /// The Patient an Observation's subject points to, if it points to one.
    fn subject_patient(&self, observation: &ObservationModel) -> Option<&PatientModel> {
        observation
            .subject
            .as_deref()
            .and_then(|subject| subject.strip_prefix("Patient/"))
            .and_then(|id| self.patient(id))
    }
}

fn random_patient(rng: &mut Rng) -> PatientModel {
    let name_count = match rng.below(100) {
        0..=7 => 0,
        8..=87 => 1,
        _ => 2,
    };
    let names = (0..name_count)
        .map(|_| {
            let family = rng.chance(90).then(|| rng.pick(FAMILIES));
            let mut given: Vec<&str> = (0..rng.below(3)).map(|_| rng.pick(GIVENS)).collect();
            if family.is_none() && given.is_empty() {
                given.push(rng.pick(GIVENS));
            }
            NameModel { family, given }
        })
        .collect();
    let birth_date = rng.chance(85).then(|| {
        let year = rng.pick(BIRTH_YEARS);
        let (month, day) = (1 + rng.below(12), 1 + rng.below(28));
        match rng.below(20) {
            0..=3 => format!("{year:04}"),
            4..=8 => format!("{year:04}-{month:02}"),
            _ => format!("{year:04}-{month:02}-{day:02}"),
        }
    });
    let identifiers = (0..rng.below(4))
        .map(|_| (rng.pick(IDENTIFIER_SYSTEMS), rng.pick(IDENTIFIER_VALUES)))
        .collect();
    PatientModel {
        id: String::new(),
        names,
        gender: rng.chance(85).then(|| rng.pick(GENDERS)),
        birth_date,
        identifiers,
    }
}

/// A dateTime for an instant, in UTC (`Z`) or at an offset.
fn render_instant(instant: i64, offset_hours: i32) -> String {
    let utc = chrono::DateTime::from_timestamp(instant, 0).unwrap();
    if offset_hours == 0 {
        utc.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        utc.with_timezone(&FixedOffset::east_opt(offset_hours * 3600).unwrap())
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }
}

fn random_effective(rng: &mut Rng) -> Effective {
    // Early 2020, between 03:00 and 21:00 UTC: a day's boundaries do not move with the offsets
    // used (at most five hours).
    let instant = ymd(2020, 1, 1)
        + 86_400 * rng.below(91) as i64
        + 3_600 * (3 + rng.below(18)) as i64
        + rng.below(3_600) as i64;
    let offset = rng.pick(&[0, 0, 2, -5]);
    let day = chrono::DateTime::from_timestamp(instant, 0).unwrap();
    match rng.below(20) {
        0 => Effective::Absent,
        1 | 2 => Effective::DateTime(day.format("%Y-%m-%d").to_string()),
        3 => Effective::DateTime(day.format("%Y-%m").to_string()),
        4..=12 => Effective::DateTime(render_instant(instant, offset)),
        13..=17 => Effective::Period {
            start: render_instant(instant, offset),
            end: Some(render_instant(
                instant + 3_600 + rng.below(40 * 86_400) as i64,
                offset,
            )),
        },
        _ => Effective::Period {
            start: render_instant(instant, offset),
            end: None,
        },
    }
}

/// A quantity's decimal: never on a boundary that the precision of any generated search value
/// implies (no `.5` in one decimal, no final `5` in two), so the oracle never depends on
/// whether a boundary is open or closed.
fn random_decimal(rng: &mut Rng) -> String {
    let whole = 40 + rng.below(121);
    let digit = |rng: &mut Rng| rng.pick(&[1, 2, 3, 4, 6, 7, 8, 9]);
    match rng.below(10) {
        0..=5 => whole.to_string(),
        6 | 7 => format!("{whole}.{}", digit(rng)),
        _ => format!("{whole}.{}{}", rng.below(10), digit(rng)),
    }
}

fn random_observation(rng: &mut Rng, patients: &[PatientModel]) -> ObservationModel {
    let mut codings = Vec::new();
    for _ in 0..1 + rng.below(2) {
        let coding = (rng.pick(CODE_SYSTEMS), rng.pick(CODES));
        if !codings.contains(&coding) {
            codings.push(coding);
        }
    }
    let quantity = rng.chance(85).then(|| {
        let (system, code, unit) = rng.pick(QUANTITY_UNITS);
        QuantityModel {
            value: random_decimal(rng),
            system,
            code,
            unit,
        }
    });
    let subject = match rng.below(100) {
        0..=84 => Some(format!(
            "Patient/{}",
            patients[rng.below(patients.len())].id
        )),
        85..=92 => Some(GROUP_REFERENCE.to_string()),
        _ => None,
    };
    ObservationModel {
        id: String::new(),
        status: rng.pick(STATUSES),
        codings,
        effective: random_effective(rng),
        quantity,
        subject,
    }
}

async fn create_world(app: &TestApp, rng: &mut Rng) -> World {
    let mut patients = Vec::new();
    for _ in 0..60 {
        let mut patient = random_patient(rng);
        patient.id = app.create_id(&patient.json()).await;
        patients.push(patient);
    }
    let mut observations = Vec::new();
    for _ in 0..150 {
        let mut observation = random_observation(rng, &patients);
        observation.id = app.create_id(&observation.json()).await;
        observations.push(observation);
    }
    let patient_index = patients
        .iter()
        .enumerate()
        .map(|(index, patient)| (patient.id.clone(), index))
        .collect();
    World {
        patients,
        observations,
        patient_index,
    }
}

// ---------------------------------------------------------------------------------------------
// The query grammar: each criterion is a parameter as sent and its meaning for the oracle.

type Test<T> = Box<dyn Fn(&T, &World) -> bool + Send + Sync>;

/// A token's `(system, code)`: an Identifier's system and value, a Coding's system and code.
type Coding = (Option<&'static str>, &'static str);

/// One date alternative: its prefix and the range of its value.
type DateAlternative = (Prefix, (i64, i64));

/// A parameter for `:missing`, and whether a resource has a value for it.
type Presence<T> = (&'static str, fn(&T) -> bool);

struct Criterion<T> {
    name: String,
    value: String,
    test: Test<T>,
}

/// Which forms a generated criterion may take.
#[derive(Clone, Copy)]
struct Allow {
    /// `:exact`, `:not`, `:missing`.
    modifiers: bool,
    /// Chains, `_has`, composites, references.
    nested: bool,
}

const EVERYTHING: Allow = Allow {
    modifiers: true,
    nested: true,
};
const PLAIN: Allow = Allow {
    modifiers: false,
    nested: false,
};

/// A string search value: a prefix of a value of `pool`, in another case or without accents,
/// or a whole value for `:exact` (sometimes in another case, or cut short, which must fail).
fn string_query_value(rng: &mut Rng, pool: &[&str], exact: bool) -> String {
    let source = rng.pick(pool);
    let characters: Vec<char> = source.chars().collect();
    let cut: String = characters[..1 + rng.below(characters.len())]
        .iter()
        .collect();
    if rng.chance(5) {
        return "Qx".into();
    }
    if exact {
        return match rng.below(5) {
            0..=2 => source.to_string(),
            3 => source.to_uppercase(),
            _ => cut,
        };
    }
    match rng.below(4) {
        0 => cut.to_uppercase(),
        1 => cut.to_lowercase(),
        2 => fold(&cut),
        _ => cut,
    }
}

fn string_criterion(rng: &mut Rng, allow: Allow) -> Criterion<PatientModel> {
    let code = rng.pick(&["name", "family", "given"]);
    let pool = match code {
        "family" => FAMILIES,
        "given" => GIVENS,
        _ if rng.chance(50) => FAMILIES,
        _ => GIVENS,
    };
    let exact = allow.modifiers && rng.chance(25);
    let alternatives: Vec<String> = (0..1 + rng.below(2))
        .map(|_| string_query_value(rng, pool, exact))
        .collect();
    Criterion {
        name: if exact {
            format!("{code}:exact")
        } else {
            code.to_string()
        },
        value: alternatives
            .iter()
            .map(|value| escape(value))
            .collect::<Vec<_>>()
            .join(","),
        test: Box::new(move |patient, _| {
            let strings = patient.strings(code);
            alternatives.iter().any(|query| {
                strings
                    .iter()
                    .any(|target| string_matches(target, query, exact))
            })
        }),
    }
}

fn random_prefix(rng: &mut Rng, for_dates: bool) -> Prefix {
    let all = [
        Prefix::None,
        Prefix::None,
        Prefix::Eq,
        Prefix::Ne,
        Prefix::Gt,
        Prefix::Lt,
        Prefix::Ge,
        Prefix::Le,
        Prefix::Sa,
        Prefix::Eb,
    ];
    // `sa` and `eb` are range comparisons: dates only. `ap` is left to the server's judgement
    // by R4 and not generated.
    rng.pick(if for_dates { &all[..] } else { &all[..8] })
}

/// A date search value: near a value in `samples` (on it, its last second, a day or a second
/// off) or anywhere in `years`, at a random precision, sometimes at an offset.
fn date_query_value(rng: &mut Rng, years: &[i32], samples: &[String]) -> String {
    let instant = if !samples.is_empty() && rng.chance(65) {
        let (low, high) = date_range(&samples[rng.below(samples.len())]);
        match rng.below(4) {
            0 => low,
            1 if high != i64::MAX => high - 1,
            2 => low + 86_400 * (rng.below(3) as i64 - 1),
            _ => low + rng.below(3) as i64 - 1,
        }
    } else {
        ymd(
            rng.pick(years),
            1 + rng.below(12) as u32,
            1 + rng.below(28) as u32,
        ) + rng.below(86_400) as i64
    };
    let utc = chrono::DateTime::from_timestamp(instant, 0).unwrap();
    match rng.below(6) {
        0 => format!("{:04}", utc.year()),
        1 => utc.format("%Y-%m").to_string(),
        2 | 3 => utc.format("%Y-%m-%d").to_string(),
        4 => render_instant(instant, 0),
        _ => render_instant(instant, 2),
    }
}

/// Date alternatives (usually one) with their prefixes.
fn date_alternatives(
    rng: &mut Rng,
    years: &[i32],
    samples: &[String],
) -> (String, Vec<DateAlternative>) {
    let alternatives: Vec<(Prefix, String)> = (0..if rng.chance(15) { 2 } else { 1 })
        .map(|_| {
            (
                random_prefix(rng, true),
                date_query_value(rng, years, samples),
            )
        })
        .collect();
    let text = alternatives
        .iter()
        .map(|(prefix, value)| format!("{}{value}", prefix.text()))
        .collect::<Vec<_>>()
        .join(",");
    let ranges = alternatives
        .into_iter()
        .map(|(prefix, value)| (prefix, date_range(&value)))
        .collect();
    (text, ranges)
}

fn birthdate_criterion(rng: &mut Rng, world: &World) -> Criterion<PatientModel> {
    let samples: Vec<String> = world
        .patients
        .iter()
        .filter_map(|patient| patient.birth_date.clone())
        .collect();
    let (value, alternatives) = date_alternatives(rng, &[1947, 1950, 1953, 1979, 1981], &samples);
    Criterion {
        name: "birthdate".into(),
        value,
        test: Box::new(move |patient, _| {
            patient.birth_date.as_deref().is_some_and(|birth_date| {
                let target = date_range(birth_date);
                alternatives
                    .iter()
                    .any(|&(prefix, query)| date_matches(prefix, query, target))
            })
        }),
    }
}

/// A token criterion over `(system, code)` pairs that `values` extracts: OR-values, or a single
/// value with `:not` (which also matches resources without any value).
fn token_criterion<T: 'static>(
    rng: &mut Rng,
    allow: Allow,
    code: &str,
    systems: &[&str],
    codes: &[&str],
    values: fn(&T) -> Vec<Coding>,
) -> Criterion<T> {
    let not = allow.modifiers && rng.chance(25);
    let count = if not { 1 } else { 1 + rng.below(2) };
    let alternatives: Vec<TokenQuery> = (0..count)
        .map(|_| TokenQuery::random(rng, systems, codes))
        .collect();
    Criterion {
        name: if not {
            format!("{code}:not")
        } else {
            code.to_string()
        },
        value: alternatives
            .iter()
            .map(TokenQuery::text)
            .collect::<Vec<_>>()
            .join(","),
        test: Box::new(move |item, _| {
            let found = values(item).iter().any(|&(system, code)| {
                alternatives.iter().any(|query| query.matches(system, code))
            });
            found != not
        }),
    }
}

/// A plain code (Patient.gender, Observation.status): OR-values, or one value with `:not`.
fn code_criterion<T: 'static>(
    rng: &mut Rng,
    allow: Allow,
    code: &str,
    pool: &[&'static str],
    value: fn(&T) -> Option<&'static str>,
) -> Criterion<T> {
    let not = allow.modifiers && rng.chance(30);
    let count = if not { 1 } else { 1 + rng.below(2) };
    let alternatives: Vec<&str> = (0..count).map(|_| rng.pick(pool)).collect();
    Criterion {
        name: if not {
            format!("{code}:not")
        } else {
            code.to_string()
        },
        value: alternatives.join(","),
        test: Box::new(move |item, _| {
            let found = value(item).is_some_and(|value| alternatives.contains(&value));
            found != not
        }),
    }
}

fn id_criterion<T: Model + 'static>(rng: &mut Rng, items: &[T]) -> Criterion<T> {
    let ids: Vec<String> = (0..1 + rng.below(3))
        .map(|_| {
            if rng.chance(85) {
                items[rng.below(items.len())].id().to_string()
            } else {
                "no-such-id".into()
            }
        })
        .collect();
    Criterion {
        name: "_id".into(),
        value: ids.join(","),
        test: Box::new(move |item, _| ids.iter().any(|id| id == item.id())),
    }
}

fn missing_patient_criterion(rng: &mut Rng) -> Criterion<PatientModel> {
    let presences: [Presence<PatientModel>; 6] = [
        ("name", |patient| !patient.names.is_empty()),
        ("family", |patient| {
            patient.names.iter().any(|name| name.family.is_some())
        }),
        ("given", |patient| {
            patient.names.iter().any(|name| !name.given.is_empty())
        }),
        ("gender", |patient| patient.gender.is_some()),
        ("birthdate", |patient| patient.birth_date.is_some()),
        ("identifier", |patient| !patient.identifiers.is_empty()),
    ];
    let (code, present) = presences[rng.below(presences.len())];
    let missing = rng.chance(50);
    Criterion {
        name: format!("{code}:missing"),
        value: missing.to_string(),
        test: Box::new(move |patient, _| present(patient) != missing),
    }
}

/// `_has:Observation:{patient|subject}:{plain observation criterion}`.
fn has_criterion(rng: &mut Rng, world: &World) -> Criterion<PatientModel> {
    let inner = observation_criterion(rng, world, PLAIN);
    let via = rng.pick(&["patient", "subject"]);
    Criterion {
        name: format!("_has:Observation:{via}:{}", inner.name),
        value: inner.value,
        test: Box::new(move |patient, world| {
            let reference = format!("Patient/{}", patient.id);
            world.observations.iter().any(|observation| {
                observation.subject.as_deref() == Some(reference.as_str())
                    && (inner.test)(observation, world)
            })
        }),
    }
}

fn patient_criterion(rng: &mut Rng, world: &World, allow: Allow) -> Criterion<PatientModel> {
    loop {
        return match rng.below(12) {
            0..=3 => string_criterion(rng, allow),
            4 => code_criterion(rng, allow, "gender", GENDERS, |patient: &PatientModel| {
                patient.gender
            }),
            5 | 6 => birthdate_criterion(rng, world),
            7 => token_criterion(
                rng,
                allow,
                "identifier",
                &["urn:sys:a", "urn:sys:b", "urn:sys:c"],
                IDENTIFIER_VALUES,
                |patient: &PatientModel| patient.identifiers.clone(),
            ),
            8 => id_criterion(rng, &world.patients),
            9 if allow.modifiers => missing_patient_criterion(rng),
            10 | 11 if allow.nested => has_criterion(rng, world),
            _ => continue,
        };
    }
}

fn observation_date_criterion(rng: &mut Rng, world: &World) -> Criterion<ObservationModel> {
    let samples: Vec<String> = world
        .observations
        .iter()
        .flat_map(|observation| match &observation.effective {
            Effective::Absent => vec![],
            Effective::DateTime(text) => vec![text.clone()],
            Effective::Period { start, end } => {
                std::iter::once(start.clone()).chain(end.clone()).collect()
            }
        })
        .collect();
    let (value, alternatives) = date_alternatives(rng, &[2019, 2020, 2020, 2021], &samples);
    Criterion {
        name: "date".into(),
        value,
        test: Box::new(move |observation, _| {
            observation.effective.range().is_some_and(|target| {
                alternatives
                    .iter()
                    .any(|&(prefix, query)| date_matches(prefix, query, target))
            })
        }),
    }
}

/// A quantity search number: a value of the data (as written, as an integer, more precise,
/// or half-way) or any.
fn quantity_query_number(rng: &mut Rng, world: &World) -> String {
    let samples: Vec<&str> = world
        .observations
        .iter()
        .filter_map(|observation| observation.quantity.as_ref())
        .map(|quantity| quantity.value.as_str())
        .collect();
    if samples.is_empty() || rng.chance(25) {
        return (40 + rng.below(121)).to_string();
    }
    let sample = samples[rng.below(samples.len())];
    let whole = sample.split('.').next().unwrap();
    match rng.below(6) {
        0 | 1 => sample.to_string(),
        2 => whole.to_string(),
        // One digit less: `72.27` searched as `72.2` is [72.15, 72.25), which misses it.
        5 if sample.contains('.') => sample[..sample.len() - 1].trim_end_matches('.').to_string(),
        // One more digit of precision: `72` searched as `72.0` is [71.95, 72.05).
        3 if sample.contains('.') => format!("{sample}0"),
        3 => format!("{sample}.0"),
        _ => format!("{whole}.5"),
    }
}

fn quantity_criterion(rng: &mut Rng, world: &World) -> Criterion<ObservationModel> {
    let prefix = random_prefix(rng, false);
    let number = quantity_query_number(rng, world);
    let units = if rng.chance(50) {
        Units::Any
    } else {
        rng.pick(UNIT_QUERIES)
    };
    Criterion {
        name: "value-quantity".into(),
        value: format!("{}{number}{}", prefix.text(), units.suffix()),
        test: Box::new(move |observation, _| {
            observation.quantity.as_ref().is_some_and(|quantity| {
                units.matches(quantity) && quantity_matches(prefix, &number, &quantity.value)
            })
        }),
    }
}

/// `subject` or `patient` by reference, in its several spellings.
fn reference_criterion(rng: &mut Rng, world: &World) -> Criterion<ObservationModel> {
    let patient_id = |rng: &mut Rng| {
        let subjects: Vec<&PatientModel> = world
            .observations
            .iter()
            .filter_map(|observation| world.subject_patient(observation))
            .collect();
        if rng.chance(80) && !subjects.is_empty() {
            subjects[rng.below(subjects.len())].id.clone()
        } else {
            world.patients[rng.below(world.patients.len())].id.clone()
        }
    };
    let id = patient_id(rng);
    let other = patient_id(rng);
    let (name, value, accepted): (&str, String, Vec<String>) = match rng.below(8) {
        0 => (
            "subject",
            format!("Patient/{id}"),
            vec![format!("Patient/{id}")],
        ),
        // A bare id matches that id in any type; only a Patient has it here.
        1 => ("subject", id.clone(), vec![format!("Patient/{id}")]),
        2 => ("subject:Patient", id.clone(), vec![format!("Patient/{id}")]),
        3 => ("patient", id.clone(), vec![format!("Patient/{id}")]),
        4 => (
            "patient",
            format!("Patient/{id}"),
            vec![format!("Patient/{id}")],
        ),
        5 => (
            "subject",
            GROUP_REFERENCE.to_string(),
            vec![GROUP_REFERENCE.to_string()],
        ),
        6 => (
            "subject",
            format!("Patient/{id},Patient/{other}"),
            vec![format!("Patient/{id}"), format!("Patient/{other}")],
        ),
        _ => (
            "patient",
            format!("{id},{other}"),
            vec![format!("Patient/{id}"), format!("Patient/{other}")],
        ),
    };
    Criterion {
        name: name.to_string(),
        value,
        test: Box::new(move |observation, _| {
            observation
                .subject
                .as_ref()
                .is_some_and(|subject| accepted.contains(subject))
        }),
    }
}

/// `subject:Patient.{criterion}` or `patient.{criterion}`.
fn chain_criterion(rng: &mut Rng, world: &World) -> Criterion<ObservationModel> {
    let inner = patient_criterion(rng, world, PLAIN);
    let via = rng.pick(&["subject:Patient", "patient"]);
    Criterion {
        name: format!("{via}.{}", inner.name),
        value: inner.value,
        test: Box::new(move |observation, world| {
            world
                .subject_patient(observation)
                .is_some_and(|patient| (inner.test)(patient, world))
        }),
    }
}

/// `code-value-quantity=system|code$prefix number`: both on the same Observation.
fn composite_criterion(rng: &mut Rng, world: &World) -> Criterion<ObservationModel> {
    let code = rng.pick(CODES).to_string();
    let token = if rng.chance(70) {
        TokenQuery::SystemCode(rng.pick(&[LOINC, SNOMED]).to_string(), code)
    } else {
        TokenQuery::Code(code)
    };
    let prefix = random_prefix(rng, false);
    let number = quantity_query_number(rng, world);
    Criterion {
        name: "code-value-quantity".into(),
        value: format!("{}${}{number}", token.text(), prefix.text()),
        test: Box::new(move |observation, _| {
            observation
                .codings
                .iter()
                .any(|&(system, code)| token.matches(system, code))
                && observation
                    .quantity
                    .as_ref()
                    .is_some_and(|quantity| quantity_matches(prefix, &number, &quantity.value))
        }),
    }
}

fn missing_observation_criterion(rng: &mut Rng) -> Criterion<ObservationModel> {
    let presences: [Presence<ObservationModel>; 5] = [
        ("date", |observation| {
            !matches!(observation.effective, Effective::Absent)
        }),
        ("value-quantity", |observation| {
            observation.quantity.is_some()
        }),
        ("subject", |observation| observation.subject.is_some()),
        ("patient", |observation| {
            observation
                .subject
                .as_deref()
                .is_some_and(|subject| subject.starts_with("Patient/"))
        }),
        ("code", |_| true),
    ];
    let (code, present) = presences[rng.below(presences.len())];
    let missing = rng.chance(50);
    Criterion {
        name: format!("{code}:missing"),
        value: missing.to_string(),
        test: Box::new(move |observation, _| present(observation) != missing),
    }
}

fn observation_criterion(
    rng: &mut Rng,
    world: &World,
    allow: Allow,
) -> Criterion<ObservationModel> {
    loop {
        return match rng.below(13) {
            0 | 1 => token_criterion(
                rng,
                allow,
                "code",
                &[LOINC, SNOMED],
                CODES,
                |observation: &ObservationModel| observation.codings.clone(),
            ),
            2 => code_criterion(
                rng,
                allow,
                "status",
                STATUSES,
                |observation: &ObservationModel| Some(observation.status),
            ),
            3 | 4 => observation_date_criterion(rng, world),
            5 | 6 => quantity_criterion(rng, world),
            7 if allow.nested => reference_criterion(rng, world),
            8 | 9 if allow.nested => chain_criterion(rng, world),
            10 if allow.nested => composite_criterion(rng, world),
            11 if allow.modifiers => missing_observation_criterion(rng),
            12 => id_criterion(rng, &world.observations),
            _ => continue,
        };
    }
}

/// Runs one query through the server (every page, a small random `_count`, sometimes a
/// `_sort`) and compares it with the oracle. Returns the number of matches, or what differs.
async fn check_query<T: Model>(
    app: &TestApp,
    world: &World,
    rng: &mut Rng,
    resource_type: &str,
    criteria: &[Criterion<T>],
    items: &[T],
    sorts: &[&str],
) -> Result<usize, String> {
    let expected: BTreeSet<String> = items
        .iter()
        .filter(|item| {
            criteria
                .iter()
                .all(|criterion| (criterion.test)(item, world))
        })
        .map(|item| item.id().to_string())
        .collect();
    let readable = criteria
        .iter()
        .map(|criterion| format!("{}={}", criterion.name, criterion.value))
        .collect::<Vec<_>>()
        .join("&");
    // Small pages exercise the cursor; the floor keeps a large result to about six pages.
    let count = rng.pick(&[2, 3, 5, 10, 25]).max(expected.len() / 6 + 1);
    let sort = rng.pick(sorts);
    let mut pairs: Vec<(String, String)> = criteria
        .iter()
        .map(|criterion| (criterion.name.clone(), criterion.value.clone()))
        .collect();
    pairs.push(("_count".into(), count.to_string()));
    pairs.push(("_total".into(), "accurate".into()));
    if !sort.is_empty() {
        pairs.push(("_sort".into(), sort.into()));
    }
    let label = format!("{resource_type}?{readable}  (_count={count} _sort={sort:?})");
    let pages = try_search_as(
        app,
        Caller::Ehr,
        &format!("{resource_type}?{}", encode(&pairs)),
    )
    .await
    .map_err(|error| format!("{label}\n  refused: {error}"))?;

    let mut problems = Vec::new();
    let prefix = format!("{resource_type}/");
    let got: Vec<String> = pages
        .matches
        .iter()
        .map(|key| key.strip_prefix(&prefix).unwrap_or(key).to_string())
        .collect();
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    if got_set.len() != got.len() {
        problems.push(format!("served a match twice: {got:?}"));
    }
    if got_set != expected {
        let by_id: HashMap<&str, &T> = items.iter().map(|item| (item.id(), item)).collect();
        let describe = |ids: Vec<&String>| {
            ids.iter()
                .take(6)
                .map(|id| {
                    by_id
                        .get(id.as_str())
                        .map_or_else(|| id.to_string(), |item| item.json().to_string())
                })
                .collect::<Vec<_>>()
                .join("\n      ")
        };
        problems.push(format!(
            "expected {} ids {expected:?}\n    got {} ids {got_set:?}\n    missing:\n      {}\n    \
             unexpected:\n      {}",
            expected.len(),
            got_set.len(),
            describe(expected.difference(&got_set).collect()),
            describe(got_set.difference(&expected).collect())
        ));
    }
    if pages.total != Some(expected.len() as u64) {
        problems.push(format!(
            "_total=accurate gave {:?}, the oracle {}",
            pages.total,
            expected.len()
        ));
    }
    if !pages.outcomes.is_empty() {
        problems.push(format!("parameters were ignored: {:?}", pages.outcomes));
    }
    let ordered = match sort {
        "_id" => got.windows(2).all(|pair| pair[0] < pair[1]),
        "-_id" => got.windows(2).all(|pair| pair[0] > pair[1]),
        _ => true,
    };
    if !ordered {
        problems.push(format!("not in {sort} order: {got:?}"));
    }
    if problems.is_empty() {
        Ok(expected.len())
    } else {
        Err(format!("{label}\n  {}", problems.join("\n  ")))
    }
}

/// The seed of the oracle's data and queries; `CUSTODIAN_SEARCH_SEED` replays another.
fn oracle_seed() -> u64 {
    std::env::var("CUSTODIAN_SEARCH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        // Xorshift never leaves zero.
        .filter(|seed| *seed != 0)
        .unwrap_or(0x5EA2_C4F0_0D15_EA5E)
}

async fn random_queries_agree_with_a_brute_force_oracle(app: TestApp) {
    const QUERIES: usize = 150;
    let started = Instant::now();
    let seed = oracle_seed();
    let mut rng = Rng(seed);
    let world = create_world(&app, &mut rng).await;
    let created = started.elapsed();
    let mut failures = Vec::new();
    let mut non_empty = 0;
    for round in 0..QUERIES {
        let terms = 1 + rng.below(3);
        let outcome = if round % 2 == 0 {
            let criteria: Vec<_> = (0..terms)
                .map(|_| patient_criterion(&mut rng, &world, EVERYTHING))
                .collect();
            let sorts = [
                "",
                "",
                "_id",
                "-_id",
                "birthdate",
                "-_lastUpdated",
                "family",
            ];
            check_query(
                &app,
                &world,
                &mut rng,
                "Patient",
                &criteria,
                &world.patients,
                &sorts,
            )
            .await
        } else {
            let criteria: Vec<_> = (0..terms)
                .map(|_| observation_criterion(&mut rng, &world, EVERYTHING))
                .collect();
            let sorts = ["", "", "_id", "-_id", "-date", "date", "status"];
            check_query(
                &app,
                &world,
                &mut rng,
                "Observation",
                &criteria,
                &world.observations,
                &sorts,
            )
            .await
        };
        match outcome {
            Ok(matched) => non_empty += usize::from(matched > 0),
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!(
        "search oracle ({:?}, seed {seed}): data in {created:.1?}, {QUERIES} queries in {:.1?}, \
         {non_empty} with matches, {} disagree",
        app.backend,
        started.elapsed() - created,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {QUERIES} queries disagree with the oracle (seed {seed}):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Guards the grammar itself: queries that never match would prove little.
    assert!(
        non_empty >= QUERIES / 3,
        "only {non_empty} of {QUERIES} queries matched anything"
    );
}
both_backends!(
    oracle,
    super::random_queries_agree_with_a_brute_force_oracle
);

/// R4's prefix table (search.html#prefix) on Periods that straddle the search value's range,
/// where "the value is greater or equal" leaves room for reading: `ge` is "the range above the
/// search value intersects the range of the target value, or the range of the search value
/// fully contains the range of the target value", so a Period that starts before the searched
/// day and ends within it is not `ge` that day (nor `gt`), and symmetrically for `le`.
async fn date_prefixes_follow_the_r4_table(app: TestApp) {
    // (label, start, end) around 2021-06-15; a dateTime is written with its end equal to its
    // start (one second either way).
    let targets: [(&str, &str, Option<&str>); 7] = [
        (
            "starts-before-ends-inside",
            "2021-06-14T10:00:00Z",
            Some("2021-06-15T10:00:00Z"),
        ),
        (
            "starts-inside-ends-after",
            "2021-06-15T10:00:00Z",
            Some("2021-06-16T10:00:00Z"),
        ),
        (
            "inside",
            "2021-06-15T08:00:00Z",
            Some("2021-06-15T09:00:00Z"),
        ),
        (
            "contains-the-day",
            "2021-06-14T10:00:00Z",
            Some("2021-06-17T10:00:00Z"),
        ),
        ("starts-inside-open", "2021-06-15T10:00:00Z", None),
        (
            "day-before",
            "2021-06-14T12:00:00Z",
            Some("2021-06-14T12:00:00Z"),
        ),
        (
            "day-after",
            "2021-06-16T12:00:00Z",
            Some("2021-06-16T12:00:00Z"),
        ),
    ];
    // The table written out by hand for each prefix.
    let cases: [(Prefix, &[&str]); 8] = [
        (Prefix::Eq, &["inside"]),
        (
            Prefix::Ne,
            &[
                "starts-before-ends-inside",
                "starts-inside-ends-after",
                "contains-the-day",
                "starts-inside-open",
                "day-before",
                "day-after",
            ],
        ),
        (
            Prefix::Gt,
            &[
                "starts-inside-ends-after",
                "contains-the-day",
                "starts-inside-open",
                "day-after",
            ],
        ),
        (
            Prefix::Lt,
            &[
                "starts-before-ends-inside",
                "contains-the-day",
                "day-before",
            ],
        ),
        (
            Prefix::Ge,
            &[
                "starts-inside-ends-after",
                "inside",
                "contains-the-day",
                "starts-inside-open",
                "day-after",
            ],
        ),
        (
            Prefix::Le,
            &[
                "starts-before-ends-inside",
                "inside",
                "contains-the-day",
                "day-before",
            ],
        ),
        (Prefix::Sa, &["day-after"]),
        (Prefix::Eb, &["day-before"]),
    ];

    let mut labels = HashMap::new();
    for (label, start, end) in targets {
        let mut observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "urn:test:prefix-table", "code": "x"}]}});
        match end {
            Some(end) if end == start => observation["effectiveDateTime"] = json!(start),
            Some(end) => observation["effectivePeriod"] = json!({"start": start, "end": end}),
            None => observation["effectivePeriod"] = json!({ "start": start }),
        }
        labels.insert(
            format!("Observation/{}", app.create_id(&observation).await),
            label,
        );
    }
    let day = date_range("2021-06-15");
    let mut failures = Vec::new();
    for (prefix, expected) in cases {
        // The oracle's rule agrees with the table as written out.
        for (label, start, end) in targets {
            let target = (
                date_range(start).0,
                end.map_or(i64::MAX, |end| date_range(end).1),
            );
            assert_eq!(
                date_matches(prefix, day, target),
                expected.contains(&label),
                "{prefix:?} {label}"
            );
        }
        let path = format!(
            "Observation?code=urn:test:prefix-table|x&date={}2021-06-15",
            prefix.text()
        );
        let got: BTreeSet<&str> = search(&app, &path)
            .await
            .matches
            .iter()
            .map(|key| labels[key])
            .collect();
        let expected: BTreeSet<&str> = expected.iter().copied().collect();
        if got != expected {
            failures.push(format!(
                "{path}\n    missing: {:?}\n    unexpected: {:?}",
                expected.difference(&got).collect::<Vec<_>>(),
                got.difference(&expected).collect::<Vec<_>>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "date prefixes that disagree with R4's table:\n  {}",
        failures.join("\n  ")
    );
}
both_backends!(date_prefix_table, super::date_prefixes_follow_the_r4_table);

/// `:missing` sees a value whichever index table holds it: a date (search_dates), a quantity
/// (search_numbers), a coded value (search_terms), and a value that gives no index term at all
/// (a CodeableConcept with only text, stored as a bare presence term).
async fn missing_sees_every_kind_of_value(app: TestApp) {
    let marker = "urn:test:missing|m";
    let observation = |extra: Value| {
        let mut resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "urn:test:missing", "code": "m"}]},
        });
        for (key, value) in extra.as_object().unwrap() {
            resource[key] = value.clone();
        }
        resource
    };
    let bare = app.create_id(&observation(json!({}))).await;
    let dated = app
        .create_id(&observation(json!({"effectiveDateTime": "2020-02-02"})))
        .await;
    let measured = app
        .create_id(&observation(
            json!({"valueQuantity": {"value": 5.5, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}),
        ))
        .await;
    let text_only = app
        .create_id(&observation(
            json!({"valueCodeableConcept": {"text": "only words"}}),
        ))
        .await;
    let all = [&bare, &dated, &measured, &text_only];
    let set = |ids: &[&String]| keys(ids.iter().map(|id| format!("Observation/{id}")));
    let cases: [(&str, Vec<&String>); 3] = [
        ("date", vec![&dated]),
        ("value-quantity", vec![&measured]),
        ("value-concept", vec![&text_only]),
    ];
    for (param, present) in cases {
        let absent: Vec<&String> = all
            .iter()
            .copied()
            .filter(|id| !present.contains(id))
            .collect();
        expect_matches(
            &app,
            &format!("Observation?code={}&{param}:missing=false", enc(marker)),
            &set(&present),
        )
        .await;
        expect_matches(
            &app,
            &format!("Observation?code={}&{param}:missing=true", enc(marker)),
            &set(&absent),
        )
        .await;
    }
}
both_backends!(missing_values, super::missing_sees_every_kind_of_value);

// ---------------------------------------------------------------------------------------------
// Synthea: clinical queries over realistic records.

/// Loads every Synthea bundle resource by resource (update-as-create with the bundle's ids),
/// with `urn:uuid:` references rewritten to `Type/id`. Returns the resources as sent.
async fn load_synthea(app: &TestApp) -> Vec<Value> {
    let directory = testdata_dir().join("synthea-r4-bundles");
    let mut files: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 10, "the ten Synthea bundles");
    let bundles: Vec<Value> = files
        .iter()
        .map(|path| serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
        .collect();

    let mut entries = Vec::new();
    let mut types = HashMap::new();
    for bundle in &bundles {
        for entry in bundle["entry"].as_array().unwrap() {
            let mut resource = entry["resource"].clone();
            let full_url = entry["fullUrl"].as_str().unwrap_or_default();
            if resource["id"].as_str().is_none() {
                let uuid = full_url
                    .strip_prefix("urn:uuid:")
                    .expect("a urn:uuid fullUrl");
                resource["id"] = json!(uuid);
            }
            let resource_type = resource["resourceType"].as_str().unwrap().to_string();
            types.insert(full_url.to_string(), resource_type);
            entries.push(resource);
        }
    }
    for resource in &mut entries {
        rewrite_references(resource, &types);
        let path = key(resource);
        let response = app.put(&path, resource).await;
        let status = response.status();
        assert!(
            status == 200 || status == 201,
            "PUT {path}: {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    entries
}

/// Rewrites `urn:uuid:X` references to `Type/X`, the type known from the entry whose fullUrl is
/// `urn:uuid:X`.
fn rewrite_references(value: &mut Value, types: &HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (name, member) in object.iter_mut() {
                let rewritten = match (name.as_str(), member.as_str()) {
                    ("reference", Some(text)) => types.get(text).map(|resource_type| {
                        format!("{resource_type}/{}", &text["urn:uuid:".len()..])
                    }),
                    _ => None,
                };
                match rewritten {
                    Some(reference) => *member = json!(reference),
                    None => rewrite_references(member, types),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_references(item, types);
            }
        }
        _ => {}
    }
}

fn of_type<'a>(resources: &'a [Value], resource_type: &'a str) -> Vec<&'a Value> {
    resources
        .iter()
        .filter(|resource| resource["resourceType"] == resource_type)
        .collect()
}

fn reference_of<'a>(resource: &'a Value, element: &str) -> Option<&'a str> {
    resource[element]["reference"].as_str()
}

fn has_coding(concept: &Value, system: Option<&str>, code: &str) -> bool {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|coding| {
            coding["code"] == code && system.is_none_or(|system| coding["system"] == system)
        })
}

/// The strings Patient's `name` parameter sees: every family and given name.
fn name_parts(patient: &Value) -> Vec<&str> {
    let mut parts = Vec::new();
    for name in patient["name"].as_array().into_iter().flatten() {
        parts.extend(name["family"].as_str());
        parts.extend(
            name["given"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        );
    }
    parts
}

fn effective_range(resource: &Value) -> Option<(i64, i64)> {
    match resource["effectiveDateTime"].as_str() {
        Some(text) => Some(date_range(text)),
        None => period_range(&resource["effectivePeriod"]),
    }
}

/// A resource's id.
fn id_of(resource: &Value) -> String {
    resource["id"].as_str().unwrap().to_string()
}

/// Whether a resource's `subject` is `Patient/{id}`.
fn subject_is(resource: &Value, id: &str) -> bool {
    reference_of(resource, "subject") == Some(format!("Patient/{id}").as_str())
}

/// Patients by name, birth date, identifier, gender, phone and city.
async fn synthea_patient_queries(app: &TestApp, resources: &[Value]) {
    let patients = of_type(resources, "Patient");
    // Patients by name, family and given, birth date, identifier, gender.
    for patient in &patients {
        let id = id_of(patient);
        let family = patient["name"][0]["family"].as_str().unwrap();
        let given = patient["name"][0]["given"][0].as_str().unwrap();
        let by_name = keys(
            patients
                .iter()
                .filter(|other| {
                    name_parts(other)
                        .iter()
                        .any(|part| string_matches(part, family, false))
                })
                .map(|other| key(other)),
        );
        assert!(by_name.contains(&format!("Patient/{id}")));
        expect_matches(app, &format!("Patient?name={}", enc(family)), &by_name).await;
        expect_matches(
            app,
            &format!(
                "Patient?family={}&given={}",
                enc(&family.to_uppercase()),
                enc(&given.to_lowercase())
            ),
            &keys([format!("Patient/{id}")]),
        )
        .await;
        let birth_date = patient["birthDate"].as_str().unwrap();
        let born_that_day = keys(
            patients
                .iter()
                .filter(|other| other["birthDate"] == birth_date)
                .map(|other| key(other)),
        );
        expect_matches(
            app,
            &format!("Patient?birthdate={birth_date}"),
            &born_that_day,
        )
        .await;
        let ssn = patient["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .find(|identifier| identifier["system"] == "http://hl7.org/fhir/sid/us-ssn")
            .expect("a Synthea SSN")["value"]
            .as_str()
            .unwrap();
        expect_matches(
            app,
            &format!("Patient?identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}"),
            &keys([format!("Patient/{id}")]),
        )
        .await;
    }
    for gender in ["female", "male"] {
        let expected = keys(
            patients
                .iter()
                .filter(|patient| patient["gender"] == gender)
                .map(|patient| key(patient)),
        );
        assert!(!expected.is_empty());
        expect_matches(app, &format!("Patient?gender={gender}"), &expected).await;
    }
    let born_1990_to_1992 = keys(
        patients
            .iter()
            .filter(|patient| {
                let born = date_range(patient["birthDate"].as_str().unwrap());
                date_matches(Prefix::Ge, date_range("1990"), born)
                    && date_matches(Prefix::Lt, date_range("1993"), born)
            })
            .map(|patient| key(patient)),
    );
    assert!(!born_1990_to_1992.is_empty());
    expect_matches(
        app,
        "Patient?birthdate=ge1990&birthdate=lt1993",
        &born_1990_to_1992,
    )
    .await;

    // Contact and address parameters.
    for patient in &patients {
        let phone = patient["telecom"][0]["value"].as_str().unwrap();
        let city = patient["address"][0]["city"].as_str().unwrap();
        let with_phone = keys(
            patients
                .iter()
                .filter(|other| {
                    other["telecom"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|telecom| telecom["system"] == "phone" && telecom["value"] == phone)
                })
                .map(|other| key(other)),
        );
        expect_matches(app, &format!("Patient?phone={phone}"), &with_phone).await;
        // A ContactPoint token is its value alone: R4 gives it no token system.
        expect_matches(app, &format!("Patient?telecom={phone}"), &with_phone).await;
        let cut: String = city.chars().take(4).collect();
        let in_city = keys(
            patients
                .iter()
                .filter(|other| {
                    other["address"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|address| address["city"].as_str())
                        .any(|other_city| string_matches(other_city, &cut, false))
                })
                .map(|other| key(other)),
        );
        expect_matches(
            app,
            &format!("Patient?address-city={}", enc(&cut.to_lowercase())),
            &in_city,
        )
        .await;
    }
}

/// Observations, Conditions, MedicationRequests and Encounters by patient, code, status and date.
async fn synthea_clinical_record_queries(app: &TestApp, resources: &[Value]) {
    let patients = of_type(resources, "Patient");
    let observations = of_type(resources, "Observation");
    // Observations by patient, code and date range; Conditions by clinical status;
    // MedicationRequests by status.
    let mut observation_hits = 0;
    let mut condition_hits = 0;
    let mut medication_hits = 0;
    for patient in &patients {
        let id = id_of(patient);
        let own: Vec<&Value> = observations
            .iter()
            .copied()
            .filter(|observation| subject_is(observation, &id))
            .collect();
        let mut code_counts: HashMap<&str, usize> = HashMap::new();
        for observation in &own {
            for coding in observation["code"]["coding"].as_array().unwrap() {
                if coding["system"] == LOINC {
                    *code_counts
                        .entry(coding["code"].as_str().unwrap())
                        .or_default() += 1;
                }
            }
        }
        let (code, _) = code_counts
            .iter()
            .max_by_key(|(code, count)| (**count, std::cmp::Reverse(**code)))
            .unwrap();
        let mut years: Vec<i32> = own
            .iter()
            .filter_map(|observation| effective_range(observation))
            .map(|(low, _)| chrono::DateTime::from_timestamp(low, 0).unwrap().year())
            .collect();
        years.sort();
        let from = years[years.len() / 2];
        let (low, high) = (format!("{from}-01-01"), format!("{}-01-01", from + 3));
        let expected = keys(
            own.iter()
                .filter(|observation| has_coding(&observation["code"], Some(LOINC), code))
                .filter(|observation| {
                    effective_range(observation).is_some_and(|target| {
                        date_matches(Prefix::Ge, date_range(&low), target)
                            && date_matches(Prefix::Lt, date_range(&high), target)
                    })
                })
                .map(|observation| key(observation)),
        );
        observation_hits += expected.len();
        expect_matches(
            app,
            &format!("Observation?patient={id}&code={LOINC}|{code}&date=ge{low}&date=lt{high}"),
            &expected,
        )
        .await;

        for status in ["active", "resolved"] {
            let expected = keys(
                of_type(resources, "Condition")
                    .into_iter()
                    .filter(|condition| subject_is(condition, &id))
                    .filter(|condition| has_coding(&condition["clinicalStatus"], None, status))
                    .map(key),
            );
            condition_hits += expected.len();
            expect_matches(
                app,
                &format!("Condition?patient={id}&clinical-status={status}"),
                &expected,
            )
            .await;
        }

        let expected = keys(
            of_type(resources, "MedicationRequest")
                .into_iter()
                .filter(|request| subject_is(request, &id) && request["status"] == "active")
                .map(key),
        );
        medication_hits += expected.len();
        expect_matches(
            app,
            &format!("MedicationRequest?patient=Patient/{id}&status=active"),
            &expected,
        )
        .await;
        let orders = keys(
            of_type(resources, "MedicationRequest")
                .into_iter()
                .filter(|request| subject_is(request, &id) && request["intent"] == "order")
                .map(key),
        );
        expect_matches(
            app,
            &format!("MedicationRequest?subject={id}&intent=order,plan"),
            &orders,
        )
        .await;
    }
    assert!(observation_hits > 0 && condition_hits > 0 && medication_hits > 0);

    // Encounters in the year in which the median encounter started.
    let encounters = of_type(resources, "Encounter");
    let mut starts: Vec<i64> = encounters
        .iter()
        .filter_map(|encounter| period_range(&encounter["period"]))
        .map(|(low, _)| low)
        .collect();
    starts.sort();
    let year = chrono::DateTime::from_timestamp(starts[starts.len() / 2], 0)
        .unwrap()
        .year();
    let (low, high) = (format!("{year}-01-01"), format!("{}-01-01", year + 1));
    let expected = keys(
        encounters
            .iter()
            .filter(|encounter| {
                period_range(&encounter["period"]).is_some_and(|target| {
                    date_matches(Prefix::Ge, date_range(&low), target)
                        && date_matches(Prefix::Lt, date_range(&high), target)
                })
            })
            .map(|encounter| key(encounter)),
    );
    assert!(!expected.is_empty());
    expect_matches(
        app,
        &format!("Encounter?date=ge{low}&date=lt{high}&_count=7"),
        &expected,
    )
    .await;
}

/// Chains (one and two levels), `_has`, `_include` (with `:iterate`) and `_revinclude`.
async fn synthea_chains_and_includes(app: &TestApp, resources: &[Value]) {
    let patients = of_type(resources, "Patient");
    let observations = of_type(resources, "Observation");
    let encounters = of_type(resources, "Encounter");
    // Chained: Observations of the patients with a name.
    for patient in patients.iter().take(3) {
        let family = patient["name"][0]["family"].as_str().unwrap();
        let named: Vec<String> = patients
            .iter()
            .filter(|other| {
                name_parts(other)
                    .iter()
                    .any(|part| string_matches(part, family, false))
            })
            .map(|other| id_of(other))
            .collect();
        let expected = keys(
            observations
                .iter()
                .filter(|observation| named.iter().any(|id| subject_is(observation, id)))
                .map(|observation| key(observation)),
        );
        assert!(!expected.is_empty());
        expect_matches(
            app,
            &format!(
                "Observation?subject:Patient.name={}&_count=50",
                enc(&family.to_lowercase())
            ),
            &expected,
        )
        .await;
    }

    // Reverse chained: Patients with an Observation of a code that some but not all have.
    let mut patients_by_code: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for observation in &observations {
        let Some(subject) = reference_of(observation, "subject") else {
            continue;
        };
        for coding in observation["code"]["coding"].as_array().unwrap() {
            if coding["system"] == LOINC {
                patients_by_code
                    .entry(coding["code"].as_str().unwrap())
                    .or_default()
                    .insert(subject.to_string());
            }
        }
    }
    let (code, expected) = patients_by_code
        .iter()
        .filter(|(_, holders)| holders.len() > 1 && holders.len() < patients.len())
        .min_by_key(|(code, _)| **code)
        .expect("a code that some patients have");
    expect_matches(
        app,
        &format!("Patient?_has:Observation:patient:code={LOINC}|{code}"),
        expected,
    )
    .await;
    // A selective outer criterion (one id) with an inner one that many Observations match: the
    // engine then checks `_has` per candidate (one small inner search each) instead of listing
    // every Observation of the code first. The answer must not depend on that choice.
    let observations_of = |code: &str| {
        observations
            .iter()
            .filter(|observation| has_coding(&observation["code"], Some(LOINC), code))
            .count()
    };
    let (code, expected) = patients_by_code
        .iter()
        .filter(|(_, holders)| holders.len() < patients.len())
        .max_by_key(|(code, _)| (observations_of(code), **code))
        .expect("a code that not every patient has");
    assert!(
        observations_of(code) >= 8,
        "the inner search must be much broader than the outer one"
    );
    for patient in &patients {
        let id = id_of(patient);
        let wanted = if expected.contains(&format!("Patient/{id}")) {
            keys([key(patient)])
        } else {
            BTreeSet::new()
        };
        expect_matches(
            app,
            &format!("Patient?_has:Observation:patient:code={LOINC}|{code}&_id={id}"),
            &wanted,
        )
        .await;
    }
    // And a chain whose outer criterion leaves one candidate while its inner one has several.
    let observation = observations
        .iter()
        .find(|observation| reference_of(observation, "subject").is_some())
        .expect("an Observation with a subject");
    let subject = reference_of(observation, "subject").unwrap();
    let subject_gender = patients
        .iter()
        .find(|patient| key(patient) == subject)
        .map(|patient| patient["gender"].as_str().unwrap().to_string())
        .expect("the subject is loaded");
    for gender in ["female", "male"] {
        let wanted = if gender == subject_gender {
            keys([key(observation)])
        } else {
            BTreeSet::new()
        };
        expect_matches(
            app,
            &format!(
                "Observation?_id={}&subject:Patient.gender={gender}",
                observation["id"].as_str().unwrap()
            ),
            &wanted,
        )
        .await;
    }

    // _include:iterate: an Observation's Encounter, then that Encounter's service provider.
    let (observation, encounter) = observations
        .iter()
        .find_map(|observation| {
            let encounter = reference_of(observation, "encounter")?;
            let encounter = encounters
                .iter()
                .find(|candidate| key(candidate) == encounter)?;
            reference_of(encounter, "serviceProvider")?;
            Some((observation, encounter))
        })
        .expect("an Observation whose Encounter has a service provider");
    let pages = expect_matches(
        app,
        &format!(
            "Observation?_id={}&_include=Observation:encounter\
             &_include:iterate=Encounter:service-provider",
            observation["id"].as_str().unwrap()
        ),
        &keys([key(observation)]),
    )
    .await;
    assert_eq!(
        pages.include_set(),
        keys([
            key(encounter),
            reference_of(encounter, "serviceProvider")
                .unwrap()
                .to_string()
        ])
    );

    // _include: each referenced Patient once, as an include.
    let heights: Vec<&Value> = observations
        .iter()
        .copied()
        .filter(|observation| has_coding(&observation["code"], Some(LOINC), "8302-2"))
        .collect();
    let pages = expect_matches(
        app,
        &format!("Observation?code={LOINC}|8302-2&_include=Observation:patient&_count=500"),
        &keys(heights.iter().map(|observation| key(observation))),
    )
    .await;
    assert_eq!(pages.pages, 1);
    let referenced = keys(
        heights
            .iter()
            .filter_map(|observation| reference_of(observation, "subject")),
    );
    assert_eq!(
        pages.includes.len(),
        pages.include_set().len(),
        "a Patient included twice: {:?}",
        pages.includes
    );
    assert_eq!(pages.include_set(), referenced);

    // _revinclude: Synthea has no Provenance, so two are added, for the first two patients.
    let practitioner = key(of_type(resources, "Practitioner")[0]);
    let mut provenances = BTreeSet::new();
    for patient in patients.iter().take(2) {
        let provenance = json!({
            "resourceType": "Provenance",
            "target": [{"reference": key(patient)}],
            "recorded": "2020-01-01T10:00:00Z",
            "agent": [{"who": {"reference": practitioner}}]
        });
        provenances.insert(format!("Provenance/{}", app.create_id(&provenance).await));
    }
    let pages = expect_matches(
        app,
        "Patient?_revinclude=Provenance:target&_count=100",
        &keys(patients.iter().map(|patient| key(patient))),
    )
    .await;
    assert_eq!(pages.include_set(), provenances);
    let pages = search(app, &format!("Provenance?target={}", key(patients[0]))).await;
    assert_eq!(pages.matches.len(), 1);
    assert!(provenances.is_superset(&pages.match_set()));

    // Two chained levels: Observations whose Patient's managing Organization has a name.
    let hospital = of_type(resources, "Organization")
        .into_iter()
        .find(|organization| {
            organization["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("MOUNT AUBURN"))
        })
        .expect("Mount Auburn Hospital in the Synthea organizations");
    let managed = app
        .create_id(
            &json!({"resourceType": "Patient", "name": [{"family": "Managedchain"}],
            "managingOrganization": {"reference": key(hospital)}}),
        )
        .await;
    let unmanaged = app
        .create_id(&json!({"resourceType": "Patient", "name": [{"family": "Managedchain"}]}))
        .await;
    let mut chained = BTreeSet::new();
    for patient in [&managed, &unmanaged] {
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8302-2"}]},
            "subject": {"reference": format!("Patient/{patient}")}});
        let id = app.create_id(&observation).await;
        if patient == &managed {
            chained.insert(format!("Observation/{id}"));
        }
    }
    expect_matches(
        app,
        "Observation?subject:Patient.organization.name=mount%20auburn",
        &chained,
    )
    .await;
    expect_matches(
        app,
        "Patient?organization.name=MOUNT%20AUBURN&family=Managedchain",
        &keys([format!("Patient/{managed}")]),
    )
    .await;
}

/// `:contains` outside the patient compartment, category, composites and `:text`.
async fn synthea_other_parameters(app: &TestApp, resources: &[Value]) {
    let observations = of_type(resources, "Observation");
    // Organizations (outside every patient compartment) by a word inside their name.
    let organizations = of_type(resources, "Organization");
    let hospitals = keys(
        organizations
            .iter()
            .filter(|organization| {
                std::iter::once(&organization["name"])
                    .chain(organization["alias"].as_array().into_iter().flatten())
                    .filter_map(Value::as_str)
                    .any(|name| fold(name).contains("memorial"))
            })
            .map(|organization| key(organization)),
    );
    assert!(!hospitals.is_empty());
    expect_matches(app, "Organization?name:contains=Memorial", &hospitals).await;

    // Category and composites: a component's code and value must come from the same component.
    let vital_signs = keys(
        observations
            .iter()
            .filter(|observation| {
                observation["category"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|category| has_coding(category, None, "vital-signs"))
            })
            .map(|observation| key(observation)),
    );
    expect_matches(
        app,
        "Observation?category=vital-signs&_count=200",
        &vital_signs,
    )
    .await;
    let tall = keys(
        observations
            .iter()
            .filter(|observation| {
                has_coding(&observation["code"], Some(LOINC), "8302-2")
                    && observation["valueQuantity"]["value"]
                        .as_f64()
                        .is_some_and(|value| value > 175.0)
            })
            .map(|observation| key(observation)),
    );
    assert!(!tall.is_empty());
    expect_matches(
        app,
        &format!("Observation?code-value-quantity={LOINC}|8302-2$gt175"),
        &tall,
    )
    .await;
    let high_systolic = keys(
        observations
            .iter()
            .filter(|observation| {
                observation["component"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|component| {
                        has_coding(&component["code"], Some(LOINC), "8480-6")
                            && component["valueQuantity"]["value"]
                                .as_f64()
                                .is_some_and(|value| value > 120.0)
                    })
            })
            .map(|observation| key(observation)),
    );
    assert!(!high_systolic.is_empty());
    expect_matches(
        app,
        &format!("Observation?component-code-value-quantity={LOINC}|8480-6$gt120"),
        &high_systolic,
    )
    .await;

    // Text of a code: CodeableConcept.text or a Coding's display.
    let heights_by_text = keys(
        observations
            .iter()
            .filter(|observation| {
                let concept = &observation["code"];
                std::iter::once(&concept["text"])
                    .chain(
                        concept["coding"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|coding| &coding["display"]),
                    )
                    .filter_map(Value::as_str)
                    .any(|text| string_matches(text, "body height", false))
            })
            .map(|observation| key(observation)),
    );
    assert!(!heights_by_text.is_empty());
    expect_matches(
        app,
        "Observation?code:text=body%20height&_count=100",
        &heights_by_text,
    )
    .await;
}

/// `_sort` by date in both directions, across pages.
async fn synthea_sorting(app: &TestApp, resources: &[Value]) {
    let patients = of_type(resources, "Patient");
    let observations = of_type(resources, "Observation");
    // _sort=-date over several pages: never increasing.
    let busiest = patients
        .iter()
        .max_by_key(|patient| {
            let id = id_of(patient);
            observations
                .iter()
                .filter(|observation| subject_is(observation, &id))
                .count()
        })
        .unwrap();
    let id = id_of(busiest);
    let expected = keys(
        observations
            .iter()
            .filter(|observation| subject_is(observation, &id))
            .map(|observation| key(observation)),
    );
    for (sort, descending) in [("-date", true), ("date", false)] {
        let pages = expect_matches(
            app,
            &format!("Observation?patient={id}&_sort={sort}&_count=9"),
            &expected,
        )
        .await;
        assert!(pages.pages > 1);
        let starts: Vec<i64> = pages
            .resources
            .iter()
            .map(|observation| effective_range(observation).unwrap().0)
            .collect();
        let ordered = starts.windows(2).all(|pair| {
            if descending {
                pair[0] >= pair[1]
            } else {
                pair[0] <= pair[1]
            }
        });
        assert!(ordered, "_sort={sort}: {starts:?}");
    }
}

async fn synthea_clinical_queries(app: TestApp) {
    let started = Instant::now();
    let resources = load_synthea(&app).await;
    let loaded = started.elapsed();
    assert_eq!(of_type(&resources, "Patient").len(), 8);
    synthea_patient_queries(&app, &resources).await;
    synthea_clinical_record_queries(&app, &resources).await;
    synthea_chains_and_includes(&app, &resources).await;
    synthea_other_parameters(&app, &resources).await;
    synthea_sorting(&app, &resources).await;
    eprintln!(
        "synthea ({:?}): {} resources loaded in {loaded:.1?}, queries in {:.1?}",
        app.backend,
        resources.len(),
        started.elapsed() - loaded
    );
}
both_backends!(synthea, super::synthea_clinical_queries);

// ---------------------------------------------------------------------------------------------

/// `%`, `_`, `'`, `;`, `--` and backslashes are data, never SQL patterns or syntax; `\,` `\|`
/// `\$` `\\` stand for the character escaped, and an unescaped comma still means OR.
async fn metacharacters_match_literally(app: TestApp) {
    let families = [
        "100%Pure",
        "100XPure",
        "Smith_Jones",
        "SmithXJones",
        "O'Brien",
        "OXBrien",
        "Semi;colon",
        "Semi",
        "Dash--dash",
        "Dash",
        "Back\\slash",
        "BackXslash",
        "Kim,Lee",
        "Kim",
    ];
    let mut by_family = HashMap::new();
    for family in families {
        let patient = json!({"resourceType": "Patient", "name": [{"family": family}]});
        by_family.insert(family, format!("Patient/{}", app.create_id(&patient).await));
    }
    let identifiers = [
        "a,b",
        "a",
        "b",
        "c|d",
        "e$f",
        "x\\y",
        "50%",
        "5_0",
        "x' OR '1'='1",
    ];
    let mut by_identifier = HashMap::new();
    for value in identifiers {
        let patient = json!({"resourceType": "Patient",
            "identifier": [{"system": "urn:meta", "value": value}]});
        by_identifier.insert(value, format!("Patient/{}", app.create_id(&patient).await));
    }
    for family in ["100%Pure", "100XPure"] {
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": by_family[family]}});
        app.create_id(&observation).await;
    }

    // Raw query strings: exactly what a client puts on the wire.
    let family_cases: &[(&str, &[&str])] = &[
        ("family=100%25Pure", &["100%Pure"]),
        ("family=100%25", &["100%Pure"]),
        ("family=100", &["100%Pure", "100XPure"]),
        ("family:exact=100%25Pure", &["100%Pure"]),
        ("family=%25", &[]),
        ("family=Smith_", &["Smith_Jones"]),
        ("family=_", &[]),
        ("family:exact=Smith_Jones", &["Smith_Jones"]),
        ("family=O'Brien", &["O'Brien"]),
        ("family=O%27", &["O'Brien"]),
        ("family=Semi%3B", &["Semi;colon"]),
        ("family=Semi", &["Semi;colon", "Semi"]),
        ("family=Dash--", &["Dash--dash"]),
        ("family=Back%5C%5C", &["Back\\slash"]),
        ("family:exact=Back%5C%5Cslash", &["Back\\slash"]),
        ("family=Kim%5C%2C", &["Kim,Lee"]),
        ("family:exact=Kim%5C%2CLee", &["Kim,Lee"]),
        (
            "family=Kim%2CSemi",
            &["Kim,Lee", "Kim", "Semi;colon", "Semi"],
        ),
        ("family=x'%20OR%20'1'%3D'1", &[]),
        ("name=%27%3B--", &[]),
        ("name=%27)%20OR%201%3D1--", &[]),
    ];
    for (query, expected) in family_cases {
        let expected = keys(expected.iter().map(|family| &by_family[family]));
        expect_matches(&app, &format!("Patient?{query}"), &expected).await;
    }
    let identifier_cases: &[(&str, &[&str])] = &[
        ("identifier=urn:meta%7Ca%5C%2Cb", &["a,b"]),
        ("identifier=urn:meta%7Ca%2Cb", &["a", "b"]),
        ("identifier=urn:meta%7Cc%5C%7Cd", &["c|d"]),
        ("identifier=urn:meta%7Ce%5C%24f", &["e$f"]),
        ("identifier=urn:meta%7Cx%5C%5Cy", &["x\\y"]),
        ("identifier=50%25", &["50%"]),
        ("identifier=5%25", &[]),
        ("identifier=5_0", &["5_0"]),
        ("identifier=50_", &[]),
        ("identifier=x'%20OR%20'1'%3D'1", &["x' OR '1'='1"]),
        ("identifier=x'%20OR%20'1'%3D'2", &[]),
    ];
    for (query, expected) in identifier_cases {
        let expected = keys(expected.iter().map(|value| &by_identifier[value]));
        expect_matches(&app, &format!("Patient?{query}"), &expected).await;
    }
    // Through a chain too.
    let pages = search(
        &app,
        "Observation?subject:Patient.family=100%25&_include=Observation:subject",
    )
    .await;
    assert_eq!(pages.matches.len(), 1);
    assert_eq!(pages.include_set(), keys([&by_family["100%Pure"]]));
}
both_backends!(metacharacters, super::metacharacters_match_literally);

// ---------------------------------------------------------------------------------------------

/// Lenient handling ignores an unknown parameter and says so; strict handling refuses it; a
/// malformed value is refused either way, without being repeated back.
async fn unknown_and_malformed_parameters(app: TestApp) {
    let id = app
        .create_id(
            &json!({"resourceType": "Patient", "name": [{"family": "Knownfamily"}],
                           "birthDate": "1970-01-01"}),
        )
        .await;
    let expected = keys([format!("Patient/{id}")]);

    let pages = expect_matches(&app, "Patient?family=Knownfamily&frobnicate=yes", &expected).await;
    assert_eq!(
        pages.outcomes.len(),
        1,
        "one outcome entry: {:?}",
        pages.first
    );
    let outcome = &pages.outcomes[0];
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome.to_string().contains("frobnicate"),
        "the outcome names the parameter: {outcome}"
    );
    let own_link = link(&pages.first, "self").expect("a self link");
    assert!(own_link.contains("family=Knownfamily"), "{own_link}");
    assert!(!own_link.contains("frobnicate"), "{own_link}");

    let strict = |path: &str| {
        app.client
            .get(app.url(path))
            .header("prefer", "handling=strict")
            .send()
    };
    let refused = strict("Patient?family=Knownfamily&frobnicate=yes")
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    let accepted = strict("Patient?family=Knownfamily").await.unwrap();
    assert_eq!(accepted.status(), 200);
    let body: Value = accepted.json().await.unwrap();
    let modes: Vec<&Value> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| &entry["search"]["mode"])
        .collect();
    assert_eq!(modes, [&json!("match")], "no outcome entry: {body}");

    // Malformed values: 400 in either mode, and the value is not echoed (it may be PHI).
    let malformed = [
        ("Patient?birthdate=1970-13-45", "1970-13-45"),
        ("Patient?birthdate=ge19x70", "19x70"),
        ("Observation?date=2020-02-30", "2020-02-30"),
        ("Observation?value-quantity=gt12x34q", "12x34q"),
        ("Patient?_count=manyzq", "manyzq"),
    ];
    for (path, value) in malformed {
        for prefer in ["handling=lenient", "handling=strict"] {
            let response = app
                .client
                .get(app.url(path))
                .header("prefer", prefer)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{path} ({prefer})");
            let text = response.text().await.unwrap();
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["resourceType"], "OperationOutcome", "{path}");
            assert!(!text.contains(value), "{path}: the value is echoed: {text}");
        }
    }
}
both_backends!(unknown_parameters, super::unknown_and_malformed_parameters);

// ---------------------------------------------------------------------------------------------

/// A cursor page starts after the last entry shown, whatever changed meanwhile: every original
/// match still there is seen exactly once, and nothing is shown twice.
async fn paging_stays_correct_while_data_changes(app: TestApp) {
    for (round, sort) in ["", "_id", "-_lastUpdated", "given"].iter().enumerate() {
        let family = format!("Pagewalk{}", ["alpha", "beta", "gamma", "delta"][round]);
        let mut originals = Vec::new();
        for index in 0..12 {
            let patient = json!({"resourceType": "Patient",
                "name": [{"family": family, "given": [format!("G{index:02}")]}]});
            originals.push(format!("Patient/{}", app.create_id(&patient).await));
        }
        let sort_parameter = if sort.is_empty() {
            String::new()
        } else {
            format!("&_sort={sort}")
        };
        let path = format!("Patient?family={family}&_count=5{sort_parameter}");
        let first = app.get_json(&path, 200).await;
        let mut pages = Pages::default();
        read_page(&mut pages, &first, &path).unwrap();
        assert_eq!(pages.matches.len(), 5, "{path}");
        let shown: Vec<String> = pages.matches.clone();
        let next = link(&first, "next").expect("a next link");

        // Meanwhile: a new match, one shown match deleted, one not yet shown deleted.
        let added = json!({"resourceType": "Patient",
            "name": [{"family": family, "given": ["G99"]}]});
        app.create_id(&added).await;
        let deleted_shown = &shown[0];
        let deleted_unshown = originals
            .iter()
            .find(|original| !shown.contains(original))
            .unwrap()
            .clone();
        for deleted in [deleted_shown, &deleted_unshown] {
            let status = app.delete(deleted).await.status();
            assert!(status == 200 || status == 204, "DELETE {deleted}: {status}");
        }

        let response = app.client.get(&next).send().await.unwrap();
        assert_eq!(response.status(), 200, "{next}");
        let rest = follow(&app, Caller::Ehr, &path, response.json().await.unwrap())
            .await
            .unwrap();
        let all: Vec<&String> = shown.iter().chain(&rest.matches).collect();
        let unique: BTreeSet<&String> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "{path}: shown twice: {all:?}");
        for original in &originals {
            if *original == deleted_unshown {
                assert!(
                    !rest.matches.contains(original),
                    "{path}: a resource deleted before its page was served: {original}"
                );
            } else {
                assert!(
                    unique.contains(original),
                    "{path}: {original} never shown: {all:?}"
                );
            }
        }
    }
}
both_backends!(
    paging_under_change,
    super::paging_stays_correct_while_data_changes
);

// ---------------------------------------------------------------------------------------------

fn patient_caller(patient: &str) -> DevTokenRequest {
    DevTokenRequest {
        subject: "test-patient".into(),
        roles: vec!["patient".into()],
        scope: "launch/patient patient/*.rs".into(),
        patient: Some(patient.to_string()),
        fhir_user: Some(format!("Patient/{patient}")),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    }
}

/// A patient-scoped caller finds only their own compartment: in matches, in `_include` and
/// `_revinclude`, through chains and `_has`, and in `_total`.
async fn searches_show_only_what_the_caller_may_read(app: TestApp) {
    let own = app
        .create_id(&json!({"resourceType": "Patient", "name": [{"family": "Visibleone"}]}))
        .await;
    let other = app
        .create_id(&json!({"resourceType": "Patient", "name": [{"family": "Hiddentwo"}]}))
        .await;
    let doctor = app
        .create_id(&json!({"resourceType": "Practitioner", "name": [{"family": "Hiddendoc"}]}))
        .await;
    let observation = |subject: &str| {
        json!({"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
               "subject": {"reference": subject}})
    };
    let hidden = app
        .create_id(&observation(&format!("Patient/{other}")))
        .await;
    // The caller's own Observation, pointing at what the caller may not read.
    let mut linked = observation(&format!("Patient/{own}"));
    linked["performer"] = json!([{"reference": format!("Practitioner/{doctor}")},
                                 {"reference": format!("Patient/{other}")}]);
    linked["hasMember"] = json!([{ "reference": format!("Observation/{hidden}") }]);
    let linked = app.create_id(&linked).await;
    let plain = app.create_id(&observation(&format!("Patient/{own}"))).await;

    let own_patient = keys([format!("Patient/{own}")]);
    let own_observations = keys([
        format!("Observation/{linked}"),
        format!("Observation/{plain}"),
    ]);
    let nothing = BTreeSet::new();

    // The EHR, the control: everything is there to leak.
    let control = search(
        &app,
        &format!(
            "Observation?_id={linked}&_include=Observation:performer&_include=Observation:has-member"
        ),
    )
    .await;
    assert_eq!(
        control.include_set(),
        keys([
            format!("Practitioner/{doctor}"),
            format!("Patient/{other}"),
            format!("Observation/{hidden}")
        ])
    );
    let control = search(
        &app,
        &format!("Patient?_has:Observation:performer:_id={linked}"),
    )
    .await;
    assert_eq!(control.match_set(), keys([format!("Patient/{other}")]));

    let token = app.token(patient_caller(&own));
    let pages = search_as(&app, &token, "Observation?_total=accurate&_count=1").await;
    assert_eq!(pages.match_set(), own_observations);
    assert_eq!(pages.total, Some(2));

    let pages = search_as(
        &app,
        &token,
        "Observation?_include=Observation:performer&_include=Observation:has-member\
         &_include=Observation:subject&_include:iterate=Observation:subject&_total=accurate",
    )
    .await;
    assert_eq!(pages.match_set(), own_observations);
    assert!(
        pages.include_set().is_subset(&own_patient),
        "included what the caller may not read: {:?}",
        pages.includes
    );
    assert_eq!(pages.total, Some(2));

    let pages = search_as(&app, &token, "Patient?_total=accurate").await;
    assert_eq!(pages.match_set(), own_patient);
    assert_eq!(pages.total, Some(1));

    let pages = search_as(
        &app,
        &token,
        "Patient?_revinclude=Observation:subject&_revinclude=Observation:performer",
    )
    .await;
    assert_eq!(pages.match_set(), own_patient);
    assert!(
        pages.include_set().is_subset(&own_observations),
        "{:?}",
        pages.includes
    );

    let system = search_as(&app, &token, "?_type=Patient,Observation&_total=accurate").await;
    assert_eq!(
        system.match_set(),
        own_patient
            .union(&own_observations)
            .cloned()
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(system.total, Some(3));

    let counted = search_as(&app, &token, "Observation?_summary=count").await;
    assert_eq!(counted.total, Some(2));
    assert!(counted.matches.is_empty());

    // Searches aimed at the other patient find nothing (or are refused outright).
    for path in [
        "Patient?family=Hiddentwo&_total=accurate".to_string(),
        format!("Patient?_id={other}&_total=accurate"),
        format!("Observation?subject=Patient/{other}&_total=accurate"),
        format!("Observation?_id={hidden}&_total=accurate"),
        "Observation?patient.family=Hiddentwo&_total=accurate".to_string(),
        format!("Patient?_has:Observation:performer:_id={linked}&_total=accurate"),
    ] {
        match try_search_as(&app, Caller::Bearer(&token), &path).await {
            Ok(pages) => {
                assert_eq!(pages.match_set(), nothing, "{path}");
                assert!(pages.includes.is_empty(), "{path}");
                assert_eq!(pages.total, Some(0), "{path}");
            }
            Err(error) => assert!(error.contains(": 403"), "{path}: {error}"),
        }
    }
}
both_backends!(
    access_control,
    super::searches_show_only_what_the_caller_may_read
);

/// A chain or `_has` checked per candidate is checked for a page of candidates at once (the
/// first inner candidate of each in one query): the answer must be the one a check per
/// candidate gives, also where that first inner candidate is one the caller may not see and
/// a later one decides, across pages and for callers who see different things.
async fn per_candidate_checks_in_batches(app: TestApp) {
    const SYSTEM: &str = "http://example.org/batch-codes";
    let restricted = json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]);
    let observation = |id: &str, subject: &str, code: &str, hidden: bool| {
        let mut resource = json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": SYSTEM, "code": code}]},
            "subject": {"reference": format!("Patient/{subject}")}});
        if hidden {
            resource["meta"] = json!({"security": restricted});
        }
        resource
    };
    let app = &app;
    let put = |resource: Value| async move {
        let path = format!(
            "{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        let response = app.put(&path, &resource).await;
        assert!(
            response.status().is_success(),
            "PUT {path}: {}",
            response.status()
        );
    };
    // Many female Patients with an Observation of the code elsewhere, so that `_has` beside
    // the family name and the gender chain beside the code are checked per candidate rather
    // than listed (the inner side has several times the outer side's candidates).
    for index in 0..40 {
        let filler = format!("batch-filler-{index:02}");
        put(json!({"resourceType": "Patient", "id": filler, "gender": "female"})).await;
        put(observation(
            &format!("{filler}-o"),
            &filler,
            "common",
            false,
        ))
        .await;
    }
    let mut has_for_doctor = BTreeSet::new();
    let mut has_for_ehr = BTreeSet::new();
    let mut chain_for_doctor = BTreeSet::new();
    let mut chain_for_ehr = BTreeSet::new();
    for index in 0..14 {
        let patient = format!("batch-{index:02}");
        let mut resource = json!({"resourceType": "Patient", "id": patient,
            "name": [{"family": "Batchcheck"}],
            "gender": if index % 2 == 0 { "female" } else { "male" },
            "generalPractitioner": [{"reference": "Practitioner/doc"}]});
        // Two patients the doctor may not see at all (restricted), for the chain.
        let patient_hidden = index >= 12;
        if patient_hidden {
            resource["meta"] = json!({"security": restricted});
        }
        put(resource).await;
        let key = format!("Patient/{patient}");
        match index % 4 {
            // A visible Observation of the code: matches for both.
            0 => {
                put(observation(
                    &format!("{patient}-b"),
                    &patient,
                    "common",
                    false,
                ))
                .await;
                has_for_ehr.insert(key.clone());
                if !patient_hidden {
                    has_for_doctor.insert(key.clone());
                }
            }
            // Another code only: matches for neither.
            1 => {
                put(observation(
                    &format!("{patient}-b"),
                    &patient,
                    "rare",
                    false,
                ))
                .await
            }
            // Only a restricted Observation of the code: the EHR sees it, the doctor does not.
            2 => {
                put(observation(
                    &format!("{patient}-a"),
                    &patient,
                    "common",
                    true,
                ))
                .await;
                has_for_ehr.insert(key.clone());
            }
            // A restricted one first in id order, then a visible one: both see a match.
            _ => {
                put(observation(
                    &format!("{patient}-a"),
                    &patient,
                    "common",
                    true,
                ))
                .await;
                put(observation(
                    &format!("{patient}-b"),
                    &patient,
                    "common",
                    false,
                ))
                .await;
                has_for_ehr.insert(key.clone());
                if !patient_hidden {
                    has_for_doctor.insert(key.clone());
                }
            }
        }
        // The chain: Observations of the rare code whose subject is female.
        let rare = format!("{patient}-r");
        put(observation(&rare, &patient, "rare", false)).await;
        if index % 2 == 0 {
            chain_for_ehr.insert(format!("Observation/{rare}"));
            if !patient_hidden {
                chain_for_doctor.insert(format!("Observation/{rare}"));
            }
        }
    }
    let doctor = app.token(crate::authz::practitioner_caller("doc"));
    for count in [50, 3] {
        let has = format!(
            "Patient?family=Batchcheck&_has:Observation:patient:code={SYSTEM}|common&_count={count}"
        );
        assert_eq!(search(app, &has).await.match_set(), has_for_ehr, "{has}");
        assert_eq!(
            search_as(app, &doctor, &has).await.match_set(),
            has_for_doctor,
            "{has}"
        );
        let chain =
            format!("Observation?code={SYSTEM}|rare&subject:Patient.gender=female&_count={count}");
        assert_eq!(
            search(app, &chain).await.match_set(),
            chain_for_ehr,
            "{chain}"
        );
        assert_eq!(
            search_as(app, &doctor, &chain).await.match_set(),
            chain_for_doctor,
            "{chain}"
        );
    }
}
both_backends!(
    per_candidate_batches,
    super::per_candidate_checks_in_batches
);

// ---------------------------------------------------------------------------------------------

/// Identifying values are searchable but only blinded in the index; a birth date is not in the
/// clear date table at all.
async fn the_index_holds_no_plaintext_identifier(app: TestApp) {
    let id = app
        .create_id(&json!({
            "resourceType": "Patient",
            "name": [{"family": "Zyxcanary", "given": ["Qwertcanary"]}],
            "identifier": [{"system": "urn:test:canary", "value": "ZQ-123"}],
            "birthDate": "1950-05-06"
        }))
        .await;
    let found = keys([format!("Patient/{id}")]);
    for query in [
        "family=Zyxcanary",
        "family=zyxc",
        "name=ZYXCANARY",
        "given=Qwertcanary",
        "family:exact=Zyxcanary",
        "identifier=ZQ-123",
        "identifier=urn:test:canary|ZQ-123",
        "birthdate=1950-05-06",
        "birthdate=1950-05",
        "birthdate=1950",
        "birthdate=ge1950-05-06&birthdate=le1950-05-06",
        "birthdate=gt1950-05-05&birthdate=lt1950-05-07",
    ] {
        expect_matches(&app, &format!("Patient?{query}"), &found).await;
    }
    for query in [
        "family=Zyxcanarx",
        "family:exact=zyxcanary",
        "identifier=ZQ-124",
        "identifier=urn:other|ZQ-123",
        "birthdate=1950-05-07",
        "birthdate=gt1950-05-06",
    ] {
        expect_matches(&app, &format!("Patient?{query}"), &BTreeSet::new()).await;
    }

    let terms: Vec<String> = app
        .strings("SELECT term FROM search_terms WHERE resource_type = 'Patient'")
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(!terms.is_empty(), "the Patient is indexed");
    for term in &terms {
        let lower = term.to_lowercase();
        for secret in ["zyxc", "canary", "zq-123", "qwert", "1950-05-06"] {
            assert!(!lower.contains(secret), "plaintext in the index: {term}");
        }
    }
    let blinded: Vec<String> = app
        .strings(
            "SELECT term FROM search_terms WHERE resource_type = 'Patient' \
             AND param IN ('family', 'given', 'name', 'identifier')",
        )
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(!blinded.is_empty());
    for term in &blinded {
        if term == "?" {
            // The presence term of `:missing`: says a value exists, not which.
            continue;
        }
        let hex = term.strip_prefix("h:").unwrap_or_default();
        assert!(
            hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "not a blind index term: {term}"
        );
    }
    let birth_dates = app
        .count(
            "SELECT COUNT(*) FROM search_dates WHERE resource_type = 'Patient' \
             AND param = 'birthdate'",
        )
        .await;
    assert_eq!(birth_dates, 0, "birth dates in the clear date table");
}
both_backends!(
    index_privacy,
    super::the_index_holds_no_plaintext_identifier
);

/// Runs `custodian ARGS…` against the app's data directory and database.
fn custodian_cli(app: &TestApp, arguments: &[&str]) -> (bool, String) {
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_custodian"))
            .args(arguments)
            .env("CUSTODIAN_DATA_DIR", app.data_dir())
            .env("CUSTODIAN_DATABASE_URL", &app.database_url)
            .env("CUSTODIAN_LOG", "warn")
            .output()
            .expect("run custodian")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// An index written under another format (here: rows an older build would not have written,
/// missing) is rebuilt from the resources before the next start serves a search, and by
/// `custodian reindex`; a format from a newer build stops the start instead of answering
/// wrongly. Also: names sharing a long prefix and birth dates within one year are told apart.
async fn an_index_in_another_format_is_rebuilt_before_searching(app: TestApp) {
    let patient = |family: &str, birth_date: &str| json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": birth_date});
    let first = app.create_id(&patient("Gulgowski8161", "1950-05-06")).await;
    let second = app
        .create_id(&patient("Gulgowski81612", "1950-05-17"))
        .await;
    let third = app.create_id(&patient("Gulgowski8162", "1950-06-06")).await;
    let format = || app.count("SELECT MAX(format) FROM search_index_format");
    assert_eq!(format().await, custodian::search::index::INDEX_FORMAT);

    // What an older build's index lacks (here: the Patients' family and birth date rows).
    app.execute(
        "DELETE FROM search_terms WHERE resource_type = 'Patient' \
         AND param IN ('family', 'birthdate')",
    )
    .await;
    app.execute("UPDATE search_index_format SET format = 1")
        .await;
    // The running node searches the index as it is: the rows are what finds a resource.
    expect_matches(&app, "Patient?family=Gulgowski8161", &BTreeSet::new()).await;

    let app = app.restart(|_| {}).await;
    let ids = [&first, &second, &third];
    expect_rebuilt_matches(&app, ids).await;
    assert_eq!(
        app.count("SELECT MAX(format) FROM search_index_format")
            .await,
        custodian::search::index::INDEX_FORMAT
    );

    // `custodian reindex`, beside the running node.
    app.execute("DELETE FROM search_terms WHERE resource_type = 'Patient' AND param = 'family'")
        .await;
    let (ok, output) = custodian_cli(&app, &["reindex"]);
    assert!(ok, "custodian reindex failed: {output}");
    assert!(output.contains("search index rebuilt"), "{output}");
    expect_rebuilt_matches(&app, ids).await;

    // A newer build's format: this build refuses to start rather than search it wrongly.
    app.execute("UPDATE search_index_format SET format = format + 1")
        .await;
    let empty = app.data_dir().join("nothing-to-import");
    std::fs::create_dir_all(&empty).expect("a directory");
    let (ok, output) = custodian_cli(&app, &["import", empty.to_str().expect("a UTF-8 path")]);
    assert!(!ok, "a start on a newer index format succeeded: {output}");
    assert!(output.contains("newer Custodian"), "{output}");
}

/// The queries of [`an_index_in_another_format_is_rebuilt_before_searching`] over its three
/// Patients.
async fn expect_rebuilt_matches(app: &TestApp, [first, second, third]: [&String; 3]) {
    for (query, expected) in [
        ("family=Gulgowski816", vec![first, second, third]),
        ("family=Gulgowski8161", vec![first, second]),
        ("family=Gulgowski81612", vec![second]),
        ("family:exact=Gulgowski8161", vec![first]),
        ("birthdate=1950-05-06", vec![first]),
        ("birthdate=1950-05", vec![first, second]),
        ("birthdate=1950", vec![first, second, third]),
        ("birthdate=ge1950-05-17", vec![second, third]),
    ] {
        let expected = keys(expected.iter().map(|id| format!("Patient/{id}")));
        expect_matches(app, &format!("Patient?{query}"), &expected).await;
    }
}
both_backends!(
    index_format_rebuild,
    super::an_index_in_another_format_is_rebuilt_before_searching
);

// ---------------------------------------------------------------------------------------------

async fn post_if_none_exist(app: &TestApp, resource: &Value, criteria: &str) -> reqwest::Response {
    app.client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", criteria)
        .body(resource.to_string())
        .send()
        .await
        .unwrap()
}

/// Conditional create, update and delete take any search; updates and deletes move the index.
async fn conditional_interactions_and_index_maintenance(app: TestApp) {
    let resource = json!({
        "resourceType": "Patient",
        "name": [{"family": "Condcanary", "given": ["Ada"]}],
        "birthDate": "1961-02-03",
        "identifier": [{"system": "urn:test:cond", "value": "C-1"}]
    });
    let criteria = "family=Condcanary&birthdate=1961-02-03";
    let first = post_if_none_exist(&app, &resource, criteria).await;
    assert_eq!(first.status(), 201);
    let id = first.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let again = post_if_none_exist(&app, &resource, criteria).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());

    // Same family, another birth date: the criteria still pick one.
    let sibling = app
        .create_id(&json!({"resourceType": "Patient",
            "name": [{"family": "Condcanary"}], "birthDate": "1962-02-03"}))
        .await;
    for criteria in [
        criteria,
        "given=ada&birthdate=ge1961-01-01&birthdate=lt1961-12-31",
        "identifier=urn:test:cond|C-1&gender:missing=true",
    ] {
        let again = post_if_none_exist(&app, &resource, criteria).await;
        assert_eq!(again.status(), 200, "{criteria}");
        assert_eq!(again.json::<Value>().await.unwrap()["id"], id.as_str());
    }
    let ambiguous = post_if_none_exist(&app, &resource, "family=Condcanary").await;
    assert_eq!(ambiguous.status(), 412);
    let versions = app
        .count("SELECT COUNT(*) FROM resource_versions WHERE resource_type = 'Patient'")
        .await;
    assert_eq!(versions, 2);

    // An update moves every index entry: old values stop matching, new ones start.
    let mut changed = resource.clone();
    changed["id"] = json!(id);
    changed["name"][0]["family"] = json!("Renamedcanary");
    changed["birthDate"] = json!("1971-04-05");
    changed["identifier"][0]["value"] = json!("C-2");
    let status = app.put(&format!("Patient/{id}"), &changed).await.status();
    assert_eq!(status, 200);
    let this = keys([format!("Patient/{id}")]);
    let none = BTreeSet::new();
    for query in [
        criteria,
        "identifier=urn:test:cond|C-1",
        "birthdate=1961-02-03",
    ] {
        expect_matches(&app, &format!("Patient?{query}"), &none).await;
    }
    for query in [
        "family=Renamedcanary",
        "birthdate=1971-04-05",
        "identifier=urn:test:cond|C-2",
        "family=Renamedcanary&birthdate=1971-04-05&given=Ada",
    ] {
        expect_matches(&app, &format!("Patient?{query}"), &this).await;
    }
    expect_matches(
        &app,
        "Patient?family=Condcanary",
        &keys([format!("Patient/{sibling}")]),
    )
    .await;

    // Conditional update by any search.
    changed["active"] = json!(true);
    let updated = app
        .put(
            "Patient?family=Renamedcanary&birthdate=1971-04-05",
            &changed,
        )
        .await;
    assert_eq!(updated.status(), 200);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["meta"]["versionId"], "3");

    // After a delete nothing matches.
    let status = app.delete(&format!("Patient/{id}")).await.status();
    assert!(status == 200 || status == 204, "{status}");
    for query in [
        "family=Renamedcanary".to_string(),
        "birthdate=1971-04-05".to_string(),
        "identifier=urn:test:cond|C-2".to_string(),
        format!("_id={id}"),
    ] {
        expect_matches(&app, &format!("Patient?{query}"), &none).await;
    }

    // Conditional delete by any search.
    let status = app
        .delete("Patient?family=Condcanary&birthdate=1962-02-03")
        .await
        .status();
    assert!(status == 200 || status == 204, "{status}");
    expect_matches(&app, "Patient?family=Condcanary", &none).await;
}
both_backends!(
    conditional_and_maintenance,
    super::conditional_interactions_and_index_maintenance
);

// ---------------------------------------------------------------------------------------------

/// `POST _search` with a form body answers exactly what `GET` does with the same parameters.
async fn post_search_equals_get(app: TestApp) {
    let mut patients = Vec::new();
    for (index, (family, gender, born)) in [
        ("Postgeta", "female", "1965-03-04"),
        ("Postgetb", "male", "1972"),
        ("Postgetc", "other", "1980-11"),
        ("Postgetd", "female", "1990-01-02"),
        ("Postgete", "male", "1975-06-07"),
        ("Postgetf", "female", "1985"),
    ]
    .into_iter()
    .enumerate()
    {
        let patient = json!({"resourceType": "Patient", "name": [{"family": family}],
            "gender": gender, "birthDate": born,
            "identifier": [{"system": "urn:test:pg", "value": format!("P-{index}")}]});
        patients.push(app.create_id(&patient).await);
    }
    for patient in patients.iter().step_by(2) {
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
            "subject": {"reference": format!("Patient/{patient}")}});
        app.create_id(&observation).await;
    }

    let cases = [
        "family=Postget",
        "family=postget&birthdate=ge1975",
        "name=POSTGET&gender=female,other",
        "identifier=urn:test:pg|P-2,urn:test:pg|P-4",
        "_has:Observation:patient:code=http://loinc.org|8480-6",
        "family:exact=Postgetb",
        "family=Postget&frobnicate=1",
    ];
    for case in cases {
        let form = format!("{}&_sort=_id&_count=2&_total=accurate", encode_raw(case));
        let get = search(&app, &format!("Patient?{form}")).await;
        let post = search_post(&app, "Patient/_search", &form).await;
        assert!(!get.matches.is_empty(), "{case}");
        assert_eq!(get.matches, post.matches, "{case}");
        assert_eq!(get.total, post.total, "{case}");
        assert_eq!(get.outcomes.len(), post.outcomes.len(), "{case}");
    }
    // Parameters in the URL and in the body are taken together.
    let get = search(&app, "Patient?family=Postget&gender=female&_sort=_id").await;
    let post = search_post(
        &app,
        "Patient/_search?family=Postget",
        "gender=female&_sort=_id",
    )
    .await;
    assert_eq!(get.matches, post.matches);
    assert_eq!(get.matches.len(), 3);

    // System level.
    let observation = search(&app, "Observation?_count=1").await.matches[0].clone();
    let observation_id = observation.strip_prefix("Observation/").unwrap();
    let form = format!(
        "_type=Patient,Observation&_id={},{observation_id}&_total=accurate",
        patients[1]
    );
    let get = search(&app, &format!("?{form}")).await;
    let post = search_post(&app, "_search", &form).await;
    let expected = keys([format!("Patient/{}", patients[1]), observation.clone()]);
    assert_eq!(get.match_set(), expected);
    assert_eq!(post.match_set(), expected);
    assert_eq!(get.total, Some(2));
    assert_eq!(post.total, Some(2));

    // A body that is not a form is refused.
    let response = app
        .client
        .post(app.url("Patient/_search"))
        .header("content-type", FHIR_JSON)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}
both_backends!(post_equals_get, super::post_search_equals_get);

/// Percent-encodes a readable query (`a=b&c=d|e`) pair by pair.
fn encode_raw(query: &str) -> String {
    let pairs: Vec<(String, String)> = query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap();
            (name.to_string(), value.to_string())
        })
        .collect();
    encode(&pairs)
}

// ---------------------------------------------------------------------------------------------

/// `_tag`, `_profile`, `_security`, `_lastUpdated`; `_summary`, `_count=0`, `_total`,
/// `_elements`, `_sort` and the links.
async fn common_and_result_parameters(app: TestApp) {
    let before = render_instant(chrono::Utc::now().timestamp() - 5, 0);
    let tagged = app
        .create_id(&json!({"resourceType": "Patient",
            "meta": {"tag": [{"system": "urn:test:tags", "code": "alpha"}],
                     "profile": ["http://hl7.org/fhir/StructureDefinition/Patient"]},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Resultparam</div>"},
            "name": [{"family": "Resultparam"}], "gender": "female", "birthDate": "1970"}))
        .await;
    let labelled = app
        .create_id(&json!({"resourceType": "Patient",
            "meta": {"tag": [{"system": "urn:test:tags", "code": "beta"}],
                     "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}]},
            "name": [{"family": "Resultparam"}], "gender": "male", "birthDate": "1971"}))
        .await;
    let bare = app
        .create_id(&json!({"resourceType": "Patient",
            "name": [{"family": "Resultparam"}], "birthDate": "1972"}))
        .await;
    let all = keys([
        format!("Patient/{tagged}"),
        format!("Patient/{labelled}"),
        format!("Patient/{bare}"),
    ]);
    let only = |id: &str| keys([format!("Patient/{id}")]);

    expect_matches(&app, "Patient?_tag=urn:test:tags|alpha", &only(&tagged)).await;
    expect_matches(&app, "Patient?_tag=beta", &only(&labelled)).await;
    expect_matches(
        &app,
        "Patient?family=Resultparam&_tag:not=urn:test:tags|alpha",
        &keys([format!("Patient/{labelled}"), format!("Patient/{bare}")]),
    )
    .await;
    expect_matches(
        &app,
        "Patient?_profile=http://hl7.org/fhir/StructureDefinition/Patient",
        &only(&tagged),
    )
    .await;
    expect_matches(
        &app,
        "Patient?_profile:below=http://hl7.org/fhir/StructureDefinition/",
        &only(&tagged),
    )
    .await;
    expect_matches(
        &app,
        "Patient?_profile=http://hl7.org/fhir/StructureDefinition/",
        &BTreeSet::new(),
    )
    .await;
    expect_matches(
        &app,
        "Patient?_security=http://terminology.hl7.org/CodeSystem/v3-ActReason|HTEST",
        &only(&labelled),
    )
    .await;
    expect_matches(
        &app,
        &format!("Patient?_lastUpdated=gt{}", enc(&before)),
        &all,
    )
    .await;
    expect_matches(
        &app,
        &format!("Patient?_lastUpdated=lt{}", enc(&before)),
        &BTreeSet::new(),
    )
    .await;

    let pages = expect_matches(&app, "Patient?family=Resultparam&_total=none", &all).await;
    assert_eq!(pages.first.get("total"), None);

    let pages = expect_matches(
        &app,
        "Patient?family=Resultparam&_elements=name,gender",
        &all,
    )
    .await;
    for resource in &pages.resources {
        assert!(resource.get("name").is_some(), "{resource}");
        assert!(resource.get("birthDate").is_none(), "{resource}");
        assert!(resource.get("text").is_none(), "{resource}");
        let subsetted = resource["meta"]["tag"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|tag| tag["system"] == SUBSETTED_SYSTEM && tag["code"] == "SUBSETTED");
        assert!(subsetted, "no SUBSETTED tag: {resource}");
    }
    let pages = expect_matches(
        &app,
        &format!("Patient?_id={tagged}&_summary=data"),
        &only(&tagged),
    )
    .await;
    assert!(pages.resources[0].get("text").is_none());
    assert_eq!(pages.resources[0]["birthDate"], "1970");

    let pages = expect_matches(&app, "Patient?family=Resultparam&_sort=-_id&_count=2", &all).await;
    let mut descending: Vec<String> = all.iter().cloned().collect();
    descending.reverse();
    assert_eq!(pages.matches, descending);
    assert_eq!(pages.pages, 2);
    let own_link = link(&pages.first, "self").expect("a self link");
    assert!(own_link.contains("_sort=-_id"), "{own_link}");
    let pages = expect_matches(&app, "Patient?family=Resultparam&_sort=-birthdate", &all).await;
    assert_eq!(
        pages.matches,
        [
            format!("Patient/{bare}"),
            format!("Patient/{labelled}"),
            format!("Patient/{tagged}")
        ]
    );

    // Counting only; `_count=0` is the same request as `_summary=count` (R4 3.1.1.5.4).
    for path in [
        "Patient?family=Resultparam&_summary=count",
        "Patient?family=Resultparam&_count=0&_total=accurate",
    ] {
        let bundle = app.get_json(path, 200).await;
        assert_eq!(bundle["total"], 3, "{path}");
        assert!(
            bundle["entry"].as_array().is_none_or(Vec::is_empty),
            "{path}: {bundle}"
        );
    }
}
both_backends!(common_and_result, super::common_and_result_parameters);
