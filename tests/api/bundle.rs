//! Transaction and batch Bundles (`POST /`, <http://hl7.org/fhir/R4/http.html#transaction>)
//! through the real server.
//!
//! - The Synthea bundles (`../shared/testdata`, not written by this project) load as they are:
//!   every entry created, every `urn:uuid:` reference rewritten to the id the server assigned,
//!   every reference resolving, each patient's compartment holding exactly its bundle's entries.
//! - The specification's own transaction example: refused for its `$lookup` entry, and without
//!   it each entry gets the status the specification describes. A batch keeps each entry apart.
//! - Processing order, `fullUrl` resolution (`urn:uuid:`, `urn:oid:`, absolute) at any depth,
//!   conditional references, creates, updates and deletes, and what is refused.
//! - All or nothing: a transaction failing at its 40th entry leaves no row behind, and the audit
//!   log shows the attempt.
//! - Concurrent transactions with the same conditional create make exactly one resource.
//! - Each entry is authorized on its own; size and entry limits give 413.
//!
//! All values here are synthetic test data, so failure messages print resources and responses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{testdata_dir, without_server_fields, TestApp, FHIR_JSON};

// ---------------------------------------------------------------------------------------------
// Sending Bundles and reading their answers.

/// POSTs a Bundle to the server's base with `client`; the status and the parsed body.
async fn post_with(client: &reqwest::Client, app: &TestApp, bundle: &Value) -> (u16, Value) {
    let response = client
        .post(app.url("/"))
        .header("content-type", FHIR_JSON)
        .body(bundle.to_string())
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("POST / answered {status} with non-JSON ({error}): {text}"));
    (status, body)
}

/// POSTs a Bundle as the suite's EHR system.
pub(crate) async fn post(app: &TestApp, bundle: &Value) -> (u16, Value) {
    post_with(&app.client, app, bundle).await
}

/// POSTs a Bundle with another caller's token.
async fn post_as(app: &TestApp, token: &str, bundle: &Value) -> (u16, Value) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    post_with(&client, app, bundle).await
}

fn bundle_of(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn transaction(entries: Vec<Value>) -> Value {
    bundle_of("transaction", entries)
}

fn batch(entries: Vec<Value>) -> Value {
    bundle_of("batch", entries)
}

/// A POST entry with a `fullUrl`.
fn create(full_url: &str, resource: Value) -> Value {
    let resource_type = resource["resourceType"].as_str().unwrap().to_string();
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": resource_type}})
}

/// A PUT entry to `url` (`Type/id` or `Type?criteria`).
fn update(url: &str, resource: Value) -> Value {
    json!({"resource": resource, "request": {"method": "PUT", "url": url}})
}

fn delete(url: &str) -> Value {
    json!({"request": {"method": "DELETE", "url": url}})
}

fn read(url: &str) -> Value {
    json!({"request": {"method": "GET", "url": url}})
}

fn urn() -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v4())
}

/// The response entries of a transaction-response or batch-response, checked to be one per
/// request entry.
pub(crate) fn response_entries<'a>(response: &'a Value, kind: &str, sent: usize) -> &'a [Value] {
    assert_eq!(response["resourceType"], "Bundle", "{response}");
    assert_eq!(response["type"], format!("{kind}-response"), "{response}");
    let entries = response["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), sent, "one response entry per request entry");
    entries
}

pub(crate) fn status_of(answer: &Value) -> &str {
    answer["response"]["status"].as_str().unwrap_or_default()
}

/// `Type/id` of the response's `location` (`Type/id/_history/v`), checking its form and that
/// `etag` and `lastModified` agree with it.
pub(crate) fn located(answer: &Value) -> (String, i64) {
    let response = &answer["response"];
    let location = response["location"]
        .as_str()
        .unwrap_or_else(|| panic!("no location: {answer}"));
    let parts: Vec<&str> = location.split('/').collect();
    assert_eq!(parts.len(), 4, "Type/id/_history/v: {location}");
    assert_eq!(parts[2], "_history", "{location}");
    let version: i64 = parts[3].parse().expect("a version number");
    assert_eq!(response["etag"], format!("W/\"{version}\""), "{answer}");
    let modified = response["lastModified"].as_str().unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(modified).is_ok(),
        "lastModified {modified:?}"
    );
    (format!("{}/{}", parts[0], parts[1]), version)
}

/// Every diagnostics text of an OperationOutcome, joined.
fn diagnostics(outcome: &Value) -> String {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|issue| issue["diagnostics"].as_str())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// `Type/id` of a resource.
fn key(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or("?"),
        resource["id"].as_str().unwrap_or("?")
    )
}

/// Every `reference` string in a value, at any depth.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            for (name, member) in object {
                match (name.as_str(), member) {
                    ("reference", Value::String(text)) => found.push(text.clone()),
                    _ => references(member, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, found)),
        _ => {}
    }
}

/// Rewrites the references that `map` knows, at any depth (what the server is expected to do).
fn rewrite(value: &mut Value, map: &HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (name, member) in object.iter_mut() {
                match (name.as_str(), member) {
                    ("reference", Value::String(text)) => {
                        if let Some(target) = map.get(text.as_str()) {
                            *text = target.clone();
                        }
                    }
                    (_, member) => rewrite(member, map),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite(item, map)),
        _ => {}
    }
}

/// Every match of a search, over all of its pages.
async fn search_all(app: &TestApp, path: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut bundle = app.get_json(path, 200).await;
    for _ in 0..200 {
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            if entry["search"]["mode"] == "match" {
                found.push(entry["resource"].clone());
            }
        }
        let next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|link| link["relation"] == "next")
            .and_then(|link| link["url"].as_str())
            .map(str::to_string);
        let Some(next) = next else {
            return found;
        };
        let response = app.client.get(&next).send().await.expect("next page");
        assert_eq!(response.status(), 200, "{next}");
        bundle = response.json().await.expect("json");
    }
    panic!("{path}: more than 200 pages");
}

fn search_keys(resources: &[Value]) -> BTreeSet<String> {
    resources.iter().map(key).collect()
}

/// The row counts a transaction that failed must leave as they were.
#[derive(Debug, PartialEq, Eq)]
struct Rows {
    versions: i64,
    heads: i64,
    terms: i64,
    dates: i64,
    numbers: i64,
}

async fn rows(app: &TestApp) -> Rows {
    Rows {
        versions: app.count("SELECT COUNT(*) FROM resource_versions").await,
        heads: app.count("SELECT COUNT(*) FROM resource_heads").await,
        terms: app.count("SELECT COUNT(*) FROM search_terms").await,
        dates: app.count("SELECT COUNT(*) FROM search_dates").await,
        numbers: app.count("SELECT COUNT(*) FROM search_numbers").await,
    }
}

/// Live resources per type, from the database.
async fn live_counts(app: &TestApp) -> BTreeMap<String, i64> {
    app.strings(
        "SELECT resource_type || ':' || CAST(COUNT(*) AS TEXT) FROM resource_heads \
         WHERE deleted = 0 GROUP BY resource_type",
    )
    .await
    .into_iter()
    .map(|row| {
        let row = row.expect("a row");
        let (resource_type, count) = row.split_once(':').expect("type:count");
        (resource_type.to_string(), count.parse().expect("a count"))
    })
    .collect()
}

fn caller(role: &str, scope: &str) -> DevTokenRequest {
    DevTokenRequest {
        subject: format!("bundle-{role}"),
        roles: vec![role.to_string()],
        scope: scope.to_string(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    }
}

fn compliance_officer() -> DevTokenRequest {
    DevTokenRequest {
        subject: "auditor-bundle".into(),
        roles: vec!["compliance-officer".into()],
        scope: "user/AuditEvent.rs user/Consent.rs".into(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    }
}

fn observation(subject: &str, code: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 7.2, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    })
}

fn patient(system: &str, value: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": "Bundleton", "given": ["Tess"]}],
        "birthDate": "1980-02-03"
    })
}

// ---------------------------------------------------------------------------------------------
// 1. The Synthea bundles, as they are.

/// The ten Synthea bundles: hospitals and practitioners first, then the patients.
pub(crate) fn synthea_bundles() -> Vec<(String, Value)> {
    let directory = testdata_dir().join("synthea-r4-bundles");
    let mut files: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "json")
        })
        .collect();
    let rank = |path: &std::path::PathBuf| {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let rank = if name.starts_with("hospitalInformation") {
            0
        } else if name.starts_with("practitionerInformation") {
            1
        } else {
            2
        };
        (rank, name)
    };
    files.sort_by_key(rank);
    assert_eq!(files.len(), 10, "the ten Synthea bundles");
    files
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let bundle = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            (name, bundle)
        })
        .collect()
}

/// One loaded Synthea bundle: what each entry became.
struct Loaded {
    name: String,
    /// The entries' resources as sent, references rewritten to the assigned `Type/id`s.
    expected: Vec<(String, Value)>,
}

async fn synthea_bundles_load_as_transactions(app: TestApp) {
    let started = Instant::now();
    let mut expected_counts: BTreeMap<String, i64> = BTreeMap::new();
    let mut loaded = Vec::new();
    for (name, bundle) in synthea_bundles() {
        assert_eq!(bundle["type"], "transaction", "{name}");
        let entries = bundle["entry"].as_array().unwrap();
        let (status, response) = post(&app, &bundle).await;
        assert_eq!(status, 200, "{name}: {response}");
        let answers = response_entries(&response, "transaction", entries.len());
        let mut assigned = HashMap::new();
        let mut keys = Vec::new();
        for (index, (entry, answer)) in entries.iter().zip(answers).enumerate() {
            let status = status_of(answer);
            assert!(
                status == "201 Created" || status == "200 OK",
                "{name} entry {index}: {answer}"
            );
            let (key, version) = located(answer);
            let resource_type = entry["resource"]["resourceType"].as_str().unwrap();
            assert!(key.starts_with(&format!("{resource_type}/")), "{key}");
            assert_eq!(version, 1, "{name} entry {index}: a new resource");
            *expected_counts
                .entry(resource_type.to_string())
                .or_default() += 1;
            assigned.insert(entry["fullUrl"].as_str().unwrap().to_string(), key.clone());
            keys.push(key);
        }
        let expected = entries
            .iter()
            .zip(keys)
            .map(|(entry, key)| {
                let mut resource = entry["resource"].clone();
                rewrite(&mut resource, &assigned);
                (key, resource)
            })
            .collect();
        loaded.push(Loaded { name, expected });
    }
    let load_time = started.elapsed();

    // The database holds exactly the bundles' resources, type by type.
    assert_eq!(live_counts(&app).await, expected_counts);

    // Read back through search, every type over all of its pages: each stored resource is the
    // one sent, its references rewritten to the ids assigned in the same bundle.
    let mut stored: HashMap<String, Value> = HashMap::new();
    for resource_type in expected_counts.keys() {
        let found = search_all(&app, &format!("{resource_type}?_count=200")).await;
        assert_eq!(
            found.len() as i64,
            expected_counts[resource_type],
            "{resource_type} search"
        );
        for resource in found {
            stored.insert(key(&resource), resource);
        }
    }
    for bundle in &loaded {
        for (key, sent) in &bundle.expected {
            let resource = stored
                .get(key)
                .unwrap_or_else(|| panic!("{}: {key} is not found by search", bundle.name));
            assert_eq!(
                without_server_fields(resource.clone()),
                without_server_fields(sent.clone()),
                "{}: {key} is stored as sent, with its references rewritten",
                bundle.name
            );
        }
    }

    // Every reference of every stored resource resolves: contained ones to a contained
    // resource, the others to a stored resource that reads 200.
    let mut targets = BTreeSet::new();
    for (key, resource) in &stored {
        let mut found = Vec::new();
        references(resource, &mut found);
        for reference in found {
            if let Some(local) = reference.strip_prefix('#') {
                let contained = resource["contained"].as_array().into_iter().flatten();
                assert!(
                    contained.clone().any(|c| c["id"] == local),
                    "{key}: {reference} names no contained resource"
                );
                continue;
            }
            assert!(
                stored.contains_key(&reference),
                "{key}: {reference} is not a stored resource"
            );
            targets.insert(reference);
        }
    }
    for target in &targets {
        let response = app.get(target).await;
        assert_eq!(response.status(), 200, "GET {target}");
    }

    // Each patient's compartment, type by type, holds exactly its bundle's entries.
    for bundle in loaded.iter().filter(|bundle| {
        bundle
            .expected
            .iter()
            .any(|(key, _)| key.starts_with("Patient/"))
    }) {
        let (patient, _) = bundle
            .expected
            .iter()
            .find(|(key, _)| key.starts_with("Patient/"))
            .unwrap();
        let mut by_type: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (key, resource) in &bundle.expected {
            let resource_type = resource["resourceType"].as_str().unwrap();
            if !matches!(resource_type, "Patient" | "Organization" | "Practitioner") {
                by_type
                    .entry(resource_type)
                    .or_default()
                    .insert(key.clone());
            }
        }
        assert!(by_type.len() >= 5, "{}: {by_type:?}", bundle.name);
        for (resource_type, keys) in by_type {
            let found = search_all(
                &app,
                &format!("{resource_type}?patient={patient}&_count=200"),
            )
            .await;
            assert_eq!(
                search_keys(&found),
                keys,
                "{}: {resource_type}?patient={patient}",
                bundle.name
            );
        }
    }
    eprintln!(
        "synthea transactions ({:?}): {} resources in {load_time:.1?}, checked in {:.1?}",
        app.backend,
        stored.len(),
        started.elapsed() - load_time
    );
}
both_backends!(synthea, super::synthea_bundles_load_as_transactions);

// ---------------------------------------------------------------------------------------------
// 2. The specification's examples, and a batch.

fn official_transaction_example() -> Value {
    let path = testdata_dir().join("fhir-r4-examples/Bundle-bundle-transaction.json");
    serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display())),
    )
    .unwrap()
}

async fn the_specification_example(app: TestApp) {
    let example = official_transaction_example();
    assert_eq!(example["entry"][7]["request"]["url"], "ValueSet/$lookup");

    // As published: an operation entry (`ValueSet/$lookup`) refuses the whole, nothing written.
    let before = rows(&app).await;
    let (status, outcome) = post(&app, &example).await;
    assert_eq!(status, 400, "{outcome}");
    let message = diagnostics(&outcome);
    assert!(message.contains("entry 7"), "{message}");
    assert_eq!(rows(&app).await, before);

    // What its conditional and versioned entries need: a match for entry 1's ifNoneExist,
    // Patient/123, Patient/123a at version 2 (ifMatch W/"2"), Patient/234 and a match for
    // entry 6's conditional delete to remove, and Patient/12334 to read.
    let other =
        |id: &str| json!({"resourceType": "Patient", "id": id, "name": [{"family": "Other"}]});
    let existing = app
        .create_id(
            &json!({"resourceType": "Patient", "name": [{"family": "Existing"}],
            "identifier": [{"system": "http:/example.org/fhir/ids", "value": "234234"}]}),
        )
        .await;
    for id in ["123", "123a", "123a", "234", "12334"] {
        let status = app.put(&format!("Patient/{id}"), &other(id)).await.status();
        assert!(status == 200 || status == 201, "PUT Patient/{id}: {status}");
    }
    let doomed = app
        .create_id(
            &json!({"resourceType": "Patient", "name": [{"family": "Doomed"}],
            "identifier": [{"system": "urn:test:any", "value": "123456"}]}),
        )
        .await;

    // Without the operation entry, each entry gets the status the specification describes.
    let mut example = example;
    example["entry"].as_array_mut().unwrap().remove(7);
    let (status, response) = post(&app, &example).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "transaction", 9);
    let statuses: Vec<&str> = answers.iter().map(status_of).collect();
    assert_eq!(
        statuses,
        [
            "201 Created",    // POST
            "200 OK",         // POST with ifNoneExist: the match, unchanged
            "200 OK",         // PUT Patient/123
            "201 Created",    // conditional PUT that matched nothing
            "200 OK",         // PUT Patient/123a, ifMatch W/"2"
            "204 No Content", // DELETE Patient/234
            "204 No Content", // conditional DELETE
            "200 OK",         // GET Patient?name=peter
            "200 OK",         // GET Patient/12334 (its etag is not W/"4": no 304)
        ],
        "{response}"
    );
    let (created, version) = located(&answers[0]);
    assert_eq!(version, 1);
    assert_eq!(located(&answers[1]), (format!("Patient/{existing}"), 1));
    assert_eq!(located(&answers[2]), ("Patient/123".to_string(), 2));
    let (conditional, version) = located(&answers[3]);
    assert_eq!(version, 1);
    assert_eq!(located(&answers[4]), ("Patient/123a".to_string(), 3));
    for new in [&created, &conditional] {
        assert_ne!(new, &format!("Patient/{existing}"));
    }
    let stored = app.get_json(&conditional, 200).await;
    assert_eq!(stored["identifier"][0]["value"], "456456");
    let unchanged = app.get_json(&format!("Patient/{existing}"), 200).await;
    assert_eq!(unchanged["name"][0]["family"], "Existing");
    assert_eq!(unchanged["meta"]["versionId"], "1");
    assert_eq!(app.get("Patient/234").await.status(), 410);
    assert_eq!(app.get(&format!("Patient/{doomed}")).await.status(), 410);
    // The GETs ran after the writes and see them.
    let searchset = &answers[7]["resource"];
    assert_eq!(searchset["type"], "searchset", "{searchset}");
    let peters: BTreeSet<String> = searchset["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["search"]["mode"] == "match")
        .map(|entry| key(&entry["resource"]))
        .collect();
    let expected: BTreeSet<String> = [
        created.clone(),
        conditional.clone(),
        "Patient/123".into(),
        "Patient/123a".into(),
    ]
    .into();
    assert_eq!(peters, expected);
    assert_eq!(answers[8]["resource"]["id"], "12334");
}
both_backends!(specification_example, super::the_specification_example);

async fn a_batch_keeps_entries_apart(app: TestApp) {
    let subject = app.create_id(&patient("urn:test:batch", "subject")).await;
    let before = live_counts(&app).await;
    let good = observation(&format!("Patient/{subject}"), "2345-7");
    // Invalid per entry: a resource of another type than its URL, and a PUT without one.
    let wrong_type = json!({"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Observation"}});
    let no_resource = json!({"request": {"method": "PUT", "url": "Observation/x1"}});
    let bundle = batch(vec![
        create(&urn(), good.clone()),
        read("Patient/no-such-patient"),
        wrong_type,
        no_resource,
        read(&format!("Patient/{subject}")),
    ]);
    let (status, response) = post(&app, &bundle).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "batch", 5);
    let statuses: Vec<&str> = answers.iter().map(status_of).collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "404 Not Found",
            "400 Bad Request",
            "400 Bad Request",
            "200 OK"
        ],
        "{response}"
    );
    let (stored, _) = located(&answers[0]);
    let read_back = app.get_json(&stored, 200).await;
    assert_eq!(without_server_fields(read_back), good);
    for (index, answer) in answers.iter().enumerate().skip(1).take(3) {
        let message = diagnostics(&answer["response"]["outcome"]);
        assert!(!message.is_empty(), "entry {index}: {answer}");
        if index > 1 {
            assert!(message.contains(&format!("entry {index}")), "{message}");
        }
    }
    assert_eq!(answers[4]["resource"]["id"], subject.as_str());
    let mut after = before.clone();
    *after.entry("Observation".into()).or_default() += 1;
    assert_eq!(
        live_counts(&app).await,
        after,
        "only the good entry is stored"
    );
}
both_backends!(batch_entries, super::a_batch_keeps_entries_apart);

// ---------------------------------------------------------------------------------------------
// Processing order, reference resolution, conditionals, refusals.

async fn processing_order_and_resolution(app: TestApp) {
    // Processing order: DELETE, POST, PUT, then GET; response entries in request order.
    let gone = app.create_id(&patient("urn:test:order", "gone")).await;
    let kept = app.create_id(&patient("urn:test:order", "kept")).await;
    let bundle = transaction(vec![
        read("Patient?identifier=urn:test:order|"),
        update(&format!("Patient/{kept}"), {
            let mut body = patient("urn:test:order", "kept");
            body["id"] = json!(kept);
            body["active"] = json!(true);
            body
        }),
        create(&urn(), patient("urn:test:order", "new")),
        delete(&format!("Patient/{gone}")),
    ]);
    let (status, response) = post(&app, &bundle).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "transaction", 4);
    let statuses: Vec<&str> = answers.iter().map(status_of).collect();
    assert_eq!(
        statuses,
        ["200 OK", "200 OK", "201 Created", "204 No Content"]
    );
    let (new, _) = located(&answers[2]);
    let new_id = new.strip_prefix("Patient/").unwrap().to_string();
    let seen: BTreeSet<String> = answers[0]["resource"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| key(&entry["resource"]))
        .collect();
    assert_eq!(
        seen,
        [new.clone(), format!("Patient/{kept}")].into(),
        "the GET ran last"
    );
    let written = app
        .strings(
            "SELECT resource_id FROM resource_versions WHERE resource_type = 'Patient' \
             ORDER BY sequence DESC LIMIT 3",
        )
        .await;
    let written: Vec<String> = written.into_iter().rev().map(Option::unwrap).collect();
    assert_eq!(
        written,
        [gone.clone(), new_id, kept.clone()],
        "DELETE, POST, PUT"
    );

    // fullUrls of every kind resolve, at any depth; text that looks like one is left alone.
    let organization = app
        .create_id(&json!({"resourceType": "Organization", "name": "One",
            "identifier": [{"system": "urn:test:org", "value": "org-one"}]}))
        .await;
    for _ in 0..2 {
        app.create_id(&json!({"resourceType": "Organization", "name": "Twin",
            "identifier": [{"system": "urn:test:org", "value": "org-twin"}]}))
            .await;
    }
    let patient_url = urn();
    let practitioner_url = "urn:oid:1.2.840.113619.6.197";
    let location_url = "http://example.org/fhir/Location/abs-1";
    let mut person = patient("urn:test:resolve", "resolve-p1");
    person["managingOrganization"] = json!({"reference": "Organization?identifier=org-one"});
    let measured = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "glucose"},
        "subject": {"reference": patient_url},
        "performer": [{"reference": practitioner_url}, {"reference": "Organization?identifier=org-one"}],
        "extension": [{"url": "http://example.org/where", "valueReference": {"reference": location_url}}],
        "contained": [{"resourceType": "Specimen", "id": "s1", "subject": {"reference": patient_url}}],
        "specimen": {"reference": "#s1"},
        "note": [{"text": patient_url}]
    });
    let bundle = transaction(vec![
        create("urn:uuid:aaaaaaaa-0000-4000-8000-000000000001", measured),
        create(&patient_url, person),
        create(
            practitioner_url,
            json!({"resourceType": "Practitioner", "name": [{"family": "Oid"}]}),
        ),
        json!({"fullUrl": location_url, "resource": {"resourceType": "Location", "id": "abs-1", "name": "Absolute"},
               "request": {"method": "PUT", "url": "Location/abs-1"}}),
    ]);
    let (status, response) = post(&app, &bundle).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "transaction", 4);
    let (observation_key, _) = located(&answers[0]);
    let (patient_key, _) = located(&answers[1]);
    let (practitioner_key, _) = located(&answers[2]);
    assert_eq!(located(&answers[3]).0, "Location/abs-1");
    let stored = app.get_json(&observation_key, 200).await;
    assert_eq!(stored["subject"]["reference"], patient_key.as_str());
    assert_eq!(
        stored["performer"][0]["reference"],
        practitioner_key.as_str()
    );
    assert_eq!(
        stored["performer"][1]["reference"],
        format!("Organization/{organization}")
    );
    assert_eq!(
        stored["extension"][0]["valueReference"]["reference"],
        "Location/abs-1"
    );
    assert_eq!(
        stored["contained"][0]["subject"]["reference"],
        patient_key.as_str()
    );
    assert_eq!(stored["specimen"]["reference"], "#s1");
    assert_eq!(
        stored["note"][0]["text"],
        patient_url.as_str(),
        "only references"
    );
    let person = app.get_json(&patient_key, 200).await;
    assert_eq!(
        person["managingOrganization"]["reference"],
        format!("Organization/{organization}")
    );

    // Conditional references: several matches → 412, none → 404, naming the entry; a
    // conditional create that matches returns the match; a conditional update changes it.
    let before = rows(&app).await;
    let mut referring = observation("Patient?identifier=resolve-p1", "1558-6");
    referring["performer"] = json!([{"reference": "Organization?identifier=org-twin"}]);
    let bundle = transaction(vec![
        create(&urn(), patient("urn:test:x", "1")),
        create(&urn(), referring.clone()),
    ]);
    let (status, outcome) = post(&app, &bundle).await;
    assert_eq!(status, 412, "{outcome}");
    assert!(diagnostics(&outcome).contains("entry 1"), "{outcome}");
    referring["performer"] = json!([{"reference": "Organization?identifier=org-nobody"}]);
    let bundle = transaction(vec![
        create(&urn(), patient("urn:test:x", "1")),
        create(&urn(), referring.clone()),
    ]);
    let (status, outcome) = post(&app, &bundle).await;
    assert_eq!(status, 404, "{outcome}");
    assert!(diagnostics(&outcome).contains("entry 1"), "{outcome}");
    assert_eq!(
        rows(&app).await,
        before,
        "refused transactions write nothing"
    );

    referring["performer"] = json!([{"reference": "Organization?identifier=org-one"}]);
    let bundle = transaction(vec![
        json!({"fullUrl": urn(), "resource": patient("urn:test:resolve", "resolve-p1"),
               "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:test:resolve|resolve-p1"}}),
        create(&urn(), referring),
        update(
            "Organization?identifier=urn:test:org|org-one",
            json!({"resourceType": "Organization", "name": "One, renamed",
            "identifier": [{"system": "urn:test:org", "value": "org-one"}]}),
        ),
    ]);
    let (status, response) = post(&app, &bundle).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "transaction", 3);
    assert_eq!(status_of(&answers[0]), "200 OK");
    assert_eq!(located(&answers[0]), (patient_key.clone(), 1));
    let (referring_key, _) = located(&answers[1]);
    let stored = app.get_json(&referring_key, 200).await;
    assert_eq!(stored["subject"]["reference"], patient_key.as_str());
    assert_eq!(
        located(&answers[2]),
        (format!("Organization/{organization}"), 2)
    );

    // Refused before anything runs: PATCH, operations, two entries on one resource, a
    // conditional delete matching several.
    let before = rows(&app).await;
    let refusals = [
        (
            vec![
                create(&urn(), patient("urn:test:r", "1")),
                json!({"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": "W10="},
                       "request": {"method": "PATCH", "url": format!("Patient/{kept}")}}),
            ],
            400,
            "entry 1",
        ),
        (
            vec![
                create(&urn(), patient("urn:test:r", "2")),
                create(&urn(), patient("urn:test:r", "3")),
                json!({"resource": {"resourceType": "Parameters"}, "request": {"method": "POST", "url": "Patient/$validate"}}),
            ],
            400,
            "entry 2",
        ),
        (
            vec![
                delete(&format!("Patient/{kept}")),
                update(&format!("Patient/{kept}"), {
                    let mut body = patient("urn:test:order", "kept");
                    body["id"] = json!(kept);
                    body
                }),
            ],
            400,
            "entry 1",
        ),
        (
            vec![
                create(&urn(), patient("urn:test:r", "4")),
                delete("Organization?identifier=urn:test:org|org-twin"),
            ],
            412,
            "entry 1",
        ),
    ];
    for (entries, want, entry) in refusals {
        let (status, outcome) = post(&app, &transaction(entries)).await;
        assert_eq!(status, want, "{outcome}");
        let message = diagnostics(&outcome);
        assert!(message.contains(entry), "{entry}: {message}");
    }
    assert_eq!(
        rows(&app).await,
        before,
        "refused transactions write nothing"
    );
}
both_backends!(order_and_resolution, super::processing_order_and_resolution);

// ---------------------------------------------------------------------------------------------
// 3. All or nothing.

/// 45 Observations and their Patient, with the 40th entry (index 39) replaced by `failing`.
fn forty_six(failing: Value) -> Value {
    let subject = urn();
    let mut entries = vec![create(
        &subject,
        patient("urn:test:atomic", &uuid::Uuid::new_v4().to_string()),
    )];
    for index in 1..46 {
        entries.push(if index == 39 {
            failing.clone()
        } else {
            create(&urn(), observation(&subject, &format!("{index}-1")))
        });
    }
    transaction(entries)
}

async fn a_failing_entry_leaves_nothing_behind(app: TestApp) {
    let owner = app.create_id(&patient("urn:test:atomic", "owner")).await;
    let existing = app
        .create_id(&observation(&format!("Patient/{owner}"), "718-7"))
        .await;
    let before = rows(&app).await;
    let stale = {
        let mut body = observation(&format!("Patient/{owner}"), "718-7");
        body["id"] = json!(existing);
        json!({"resource": body, "request": {"method": "PUT", "url": format!("Observation/{existing}"), "ifMatch": "W/\"9\""}})
    };
    let unresolved = create(
        &urn(),
        observation("Patient?identifier=atomic-nobody", "4548-4"),
    );
    for (failing, want) in [(stale, 412), (unresolved, 404)] {
        let (status, outcome) = post(&app, &forty_six(failing)).await;
        assert_eq!(status, want, "{outcome}");
        let message = diagnostics(&outcome);
        assert!(message.contains("entry 39"), "{message}");
        assert_eq!(
            rows(&app).await,
            before,
            "nothing of a failed transaction stays"
        );
    }
    // Not compared: data_keys and patient_compartments. The new Patient's compartment keeps its
    // data key and pseudonym row after the failure (README "known limit"; reported as a bug).
    assert_eq!(
        app.get_json(&format!("Observation/{existing}"), 200).await["meta"]["versionId"],
        "1"
    );
    assert!(
        search_all(&app, "Patient?identifier=urn:test:atomic|")
            .await
            .len()
            == 1
    );

    // The audit log shows the failed attempt.
    let auditor = app.token(compliance_officer());
    let mut events = Vec::new();
    for _ in 0..50 {
        let response = app
            .anonymous
            .get(app.url("AuditEvent?subtype=transaction&outcome=4&_count=50"))
            .bearer_auth(&auditor)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let bundle: Value = response.json().await.unwrap();
        events = bundle["entry"].as_array().cloned().unwrap_or_default();
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(events.len(), 2, "the two failed transactions: {events:?}");
    for event in &events {
        let event = &event["resource"];
        assert_eq!(event["resourceType"], "AuditEvent");
        assert_eq!(event["subtype"][0]["code"], "transaction", "{event}");
        assert_eq!(event["outcome"], "4", "{event}");
    }
}
both_backends!(all_or_nothing, super::a_failing_entry_leaves_nothing_behind);

/// bdl-7: two write entries with one fullUrl make every reference to it ambiguous; the
/// transaction is refused, naming the second entry, and writes nothing (found by fuzzing
/// bundle_references).
async fn a_fullurl_names_one_entry(app: TestApp) {
    let shared = urn();
    let bundle = transaction(vec![
        create(&shared, patient("urn:test:dup", "first")),
        create(&shared, patient("urn:test:dup", "second")),
        create(&urn(), observation(&shared, "718-7")),
    ]);
    let before = rows(&app).await;
    let (status, outcome) = post(&app, &bundle).await;
    assert_eq!(status, 400, "{outcome}");
    let message = diagnostics(&outcome);
    assert!(
        message.contains("entry 1") && message.contains("bdl-7"),
        "{message}"
    );
    assert_eq!(
        rows(&app).await,
        before,
        "nothing of a refused transaction stays"
    );
}
both_backends!(duplicate_full_urls, super::a_fullurl_names_one_entry);

// ---------------------------------------------------------------------------------------------
// 4. Concurrent conditional creates.

async fn concurrent_conditional_creates_make_one(app: TestApp) {
    for round in 0..2 {
        let identifier = format!("concurrent-{round}");
        let criteria = format!("identifier=urn:test:concurrent|{identifier}");
        let bundles: Vec<Value> = (0..6)
            .map(|index| {
                let subject = urn();
                transaction(vec![
                    json!({"fullUrl": subject, "resource": patient("urn:test:concurrent", &identifier),
                           "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria}}),
                    create(&urn(), observation(&subject, &format!("{index}-0"))),
                ])
            })
            .collect();
        let results =
            futures_util::future::join_all(bundles.iter().map(|bundle| post(&app, bundle))).await;
        let mut patients = BTreeSet::new();
        let mut created = 0;
        for (status, response) in &results {
            assert_eq!(*status, 200, "{response}");
            let answers = response_entries(response, "transaction", 2);
            let (patient_key, _) = located(&answers[0]);
            match status_of(&answers[0]) {
                "201 Created" => created += 1,
                "200 OK" => {}
                other => panic!("{other}: {response}"),
            }
            assert_eq!(status_of(&answers[1]), "201 Created");
            let (observation_key, _) = located(&answers[1]);
            let stored = app.get_json(&observation_key, 200).await;
            assert_eq!(stored["subject"]["reference"], patient_key.as_str());
            patients.insert(patient_key);
        }
        assert_eq!(patients.len(), 1, "one Patient: {patients:?}");
        assert_eq!(created, 1, "exactly one transaction created it");
        let matches = search_all(&app, &format!("Patient?{criteria}")).await;
        assert_eq!(search_keys(&matches), patients);
        let patient_key = patients.into_iter().next().unwrap();
        let observations = search_all(&app, &format!("Observation?subject={patient_key}")).await;
        assert_eq!(observations.len(), 6);
    }
    assert_eq!(live_counts(&app).await.get("Patient"), Some(&2));
}
both_backends!(
    concurrent_creates,
    super::concurrent_conditional_creates_make_one
);

// ---------------------------------------------------------------------------------------------
// 5. Each entry authorized on its own.

async fn entries_are_authorized_one_by_one(app: TestApp) {
    let owner = app.create_id(&patient("urn:test:authz", "owner")).await;
    let observations_only = app.token(caller("ehr-system", "system/Observation.c"));
    let before = rows(&app).await;
    let subject = urn();
    let bundle = transaction(vec![
        create(&urn(), observation(&subject, "2339-0")),
        create(&subject, patient("urn:test:authz", "new")),
    ]);
    let (status, outcome) = post_as(&app, &observations_only, &bundle).await;
    assert_eq!(status, 403, "{outcome}");
    let message = diagnostics(&outcome);
    assert!(message.contains("entry 1"), "{message}");
    assert!(message.contains("Patient"), "{message}");
    assert_eq!(rows(&app).await, before, "nothing written");

    // The same caller in a batch: the Observation is created, the Patient refused.
    let bundle = batch(vec![
        create(&urn(), observation(&format!("Patient/{owner}"), "2339-0")),
        create(&urn(), patient("urn:test:authz", "new")),
    ]);
    let (status, response) = post_as(&app, &observations_only, &bundle).await;
    assert_eq!(status, 200, "{response}");
    let answers = response_entries(&response, "batch", 2);
    assert_eq!(status_of(&answers[0]), "201 Created", "{response}");
    assert_eq!(status_of(&answers[1]), "403 Forbidden", "{response}");
    assert!(!diagnostics(&answers[1]["response"]["outcome"]).is_empty());
    let counts = live_counts(&app).await;
    assert_eq!(counts.get("Patient"), Some(&1));
    assert_eq!(counts.get("Observation"), Some(&1));
}
both_backends!(
    entry_authorization,
    super::entries_are_authorized_one_by_one
);

// ---------------------------------------------------------------------------------------------
// 6. Limits.

async fn limits_give_413(app: TestApp) {
    let app = app
        .restart(|settings| {
            settings.max_bundle_entries = 3;
            settings.max_bundle_bytes = 4096;
        })
        .await;
    let before = rows(&app).await;
    let entries = |count: usize| -> Vec<Value> {
        (0..count)
            .map(|index| create(&urn(), patient("urn:test:limits", &index.to_string())))
            .collect()
    };
    for kind in ["transaction", "batch"] {
        let (status, outcome) = post(&app, &bundle_of(kind, entries(4))).await;
        assert_eq!(status, 413, "{kind}: {outcome}");
        let message = diagnostics(&outcome);
        assert!(
            message.contains("4 entries") && message.contains("at most 3"),
            "{kind}: {message}"
        );
        assert_eq!(outcome["issue"][0]["code"], "too-costly");
    }
    // Too many bytes, declared or streamed.
    let mut big = patient("urn:test:limits", "big");
    big["name"][0]["text"] = json!("x".repeat(5000));
    let bundle = transaction(vec![create(&urn(), big)]);
    let (status, outcome) = post(&app, &bundle).await;
    assert_eq!(status, 413, "{outcome}");
    assert!(diagnostics(&outcome).contains("4096 bytes"), "{outcome}");
    let text = bundle.to_string();
    let chunks: Vec<Result<String, std::io::Error>> = text
        .as_bytes()
        .chunks(1000)
        .map(|chunk| Ok(String::from_utf8(chunk.to_vec()).unwrap()))
        .collect();
    let response = app
        .client
        .post(app.url("/"))
        .header("content-type", FHIR_JSON)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413, "streamed");
    let outcome: Value = response.json().await.unwrap();
    assert!(diagnostics(&outcome).contains("4096 bytes"), "{outcome}");
    assert_eq!(rows(&app).await, before, "nothing written");
    // At the limits, accepted.
    let (status, response) = post(&app, &transaction(entries(3))).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(live_counts(&app).await.get("Patient"), Some(&3));
}
both_backends!(limits, super::limits_give_413);
