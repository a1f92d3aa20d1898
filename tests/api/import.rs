//! `custodian import` as the real binary against a test server's database and data directory:
//! bulk NDJSON and Synthea transaction Bundles load, are searchable over HTTP, are audited with
//! the operator as agent, and a second run writes nothing; a bad line fails alone (exit 1) and
//! is reported without its content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use custodian::authz::dev::DevTokenRequest;
use serde_json::Value;

use crate::both_backends;
use crate::helpers::{repo_dir, testdata_dir, TestApp};

/// The `USER` the CLI runs as: its audit records name `operator:import-test`.
const OPERATOR: &str = "operator:import-test";

pub(crate) struct Run {
    pub(crate) success: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `custodian import --quiet PATHS…` on the test server's database and data directory.
fn import(app: &TestApp, paths: &[&Path]) -> Run {
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_custodian"))
            .arg("import")
            .arg("--quiet")
            .args(paths)
            .env("CUSTODIAN_DATA_DIR", app.data_dir())
            .env("CUSTODIAN_DATABASE_URL", &app.database_url)
            .env("CUSTODIAN_PROFILES_DIR", repo_dir().join("fhir-profiles"))
            .env("CUSTODIAN_AUTH__POLICIES_DIR", repo_dir().join("policies"))
            .env("CUSTODIAN_AUDIT__CATALOG_DIR", repo_dir().join("audit"))
            .env("CUSTODIAN_AUTH__DEV_ISSUER", "on")
            .env("CUSTODIAN_LOG", "warn")
            .env("USER", "import-test")
            .output()
            .expect("run custodian import")
    });
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The summary's totals: created, updated, unchanged, failed.
pub(crate) fn totals(run: &Run) -> [u64; 4] {
    let line = run
        .stdout
        .lines()
        .find(|line| line.starts_with("total "))
        .unwrap_or_else(|| panic!("no total line in {}", run.stdout));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|number| number.parse().expect("a count"))
        .collect();
    numbers.try_into().expect("four counts")
}

/// How many resources of a type the API finds.
async fn total(app: &TestApp, query: &str) -> u64 {
    let separator = if query.contains('?') { '&' } else { '?' };
    let bundle = app
        .get_json(&format!("{query}{separator}_summary=count"), 200)
        .await;
    bundle["total"].as_u64().expect("a total")
}

/// Resources per type in a directory of NDJSON files.
pub(crate) fn lines_per_type(directory: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for entry in std::fs::read_dir(directory).expect("test data") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("ndjson");
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let resource: Value = serde_json::from_str(line).expect("a resource");
            *counts
                .entry(resource["resourceType"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    counts
}

async fn versions(app: &TestApp) -> i64 {
    app.count("SELECT COUNT(*) FROM resource_versions").await
}

async fn operator_records(app: &TestApp, outcome: u16) -> i64 {
    app.count(&format!(
        "SELECT COUNT(*) FROM audit_records WHERE agent = '{OPERATOR}' AND outcome = {outcome}"
    ))
    .await
}

async fn bulk_ndjson_imports_once(app: TestApp) {
    let directory = testdata_dir().join("bulk-ndjson-10-patients");
    let expected = lines_per_type(&directory);
    let resources: u64 = expected.values().sum();

    let first = import(&app, &[&directory]);
    assert!(first.success, "{}{}", first.stdout, first.stderr);
    assert_eq!(totals(&first), [resources, 0, 0, 0], "{}", first.stdout);
    for (resource_type, count) in &expected {
        assert_eq!(total(&app, resource_type).await, *count, "{resource_type}");
    }
    // The ids of the files are kept, so their `Type/id` references resolve.
    let first_patient: Value = serde_json::from_str(
        std::fs::read_to_string(directory.join("Patient.000.ndjson"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let patient_id = first_patient["id"].as_str().unwrap();
    app.get_json(&format!("Patient/{patient_id}"), 200).await;
    let conditions: u64 = std::fs::read_to_string(directory.join("Condition.000.ndjson"))
        .unwrap()
        .lines()
        .filter(|line| line.contains(&format!("\"Patient/{patient_id}\"")))
        .count() as u64;
    assert!(conditions > 0);
    assert_eq!(
        total(&app, &format!("Condition?subject=Patient/{patient_id}")).await,
        conditions
    );

    // Every write was audited with the operator as agent, found as an AuditEvent too.
    assert_eq!(operator_records(&app, 201).await, resources as i64);
    let auditor = app.token(DevTokenRequest {
        subject: "auditor-1".into(),
        roles: vec!["compliance-officer".into()],
        scope: "user/AuditEvent.rs".into(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    let events: Value = app
        .client
        .get(app.url(&format!(
            "AuditEvent?agent={OPERATOR}&entity=Patient/{patient_id}"
        )))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = events["entry"].as_array().expect("AuditEvents");
    assert_eq!(events.len(), 1, "one write of the patient");
    let event = &events[0]["resource"];
    assert_eq!(event["agent"][0]["who"]["identifier"]["value"], OPERATOR);
    assert_eq!(event["outcome"], "0");

    // A second run changes nothing.
    let before = versions(&app).await;
    let second = import(&app, &[&directory]);
    assert!(second.success, "{}{}", second.stdout, second.stderr);
    assert_eq!(totals(&second), [0, 0, resources, 0], "{}", second.stdout);
    assert_eq!(versions(&app).await, before);
}
both_backends!(bulk_ndjson, super::bulk_ndjson_imports_once);

async fn synthea_bundles_import_once(app: TestApp) {
    let directory = testdata_dir().join("synthea-r4-bundles");
    let entries: u64 = std::fs::read_dir(&directory)
        .unwrap()
        .map(|file| {
            let bundle: Value =
                serde_json::from_slice(&std::fs::read(file.unwrap().path()).unwrap()).unwrap();
            bundle["entry"].as_array().unwrap().len() as u64
        })
        .sum();

    let first = import(&app, &[&directory]);
    assert!(first.success, "{}{}", first.stdout, first.stderr);
    let [created, updated, unchanged, failed] = totals(&first);
    assert_eq!((updated, failed), (0, 0), "{}", first.stdout);
    assert_eq!(created + unchanged, entries);
    assert_eq!(total(&app, "Patient").await, 8);
    assert_eq!(total(&app, "Observation").await, 297);
    // Each patient bundle repeats some Organizations and Practitioners of the shared bundles:
    // one resource each (the first imported, from the shared bundle).
    assert_eq!(total(&app, "Organization").await, 102);
    assert_eq!(total(&app, "Practitioner").await, 102);
    let mut stored = 0;
    for resource_type in [
        "Patient",
        "Observation",
        "Organization",
        "Practitioner",
        "Claim",
        "Immunization",
        "Encounter",
        "ExplanationOfBenefit",
        "Condition",
        "Procedure",
        "DiagnosticReport",
        "MedicationRequest",
        "CarePlan",
    ] {
        stored += total(&app, resource_type).await;
    }
    assert_eq!(created, stored, "every created resource is searchable");

    // References were rewritten from urn:uuid to the stored ids.
    let patients = app.get_json("Patient?_count=1", 200).await;
    let patient_id = patients["entry"][0]["resource"]["id"].as_str().unwrap();
    let observations = app
        .get_json(&format!("Observation?subject=Patient/{patient_id}"), 200)
        .await;
    let observation = &observations["entry"][0]["resource"];
    assert_eq!(
        observation["subject"]["reference"],
        format!("Patient/{patient_id}")
    );
    let encounter = observation["encounter"]["reference"].as_str().unwrap();
    app.get_json(encounter, 200).await;

    let before = versions(&app).await;
    let second = import(&app, &[&directory]);
    assert!(second.success, "{}{}", second.stdout, second.stderr);
    assert_eq!(totals(&second), [0, 0, entries, 0], "{}", second.stdout);
    assert_eq!(versions(&app).await, before, "a re-run writes no version");
}
both_backends!(synthea, super::synthea_bundles_import_once);

async fn a_bad_line_fails_alone(app: TestApp) {
    let directory = directory_of(&[]);
    std::fs::write(
        directory.join("patients.ndjson"),
        [
            r#"{"resourceType":"Patient","id":"good-1","gender":"female"}"#,
            r#"{"resourceType":"Patient","id":"bad-1","name":[{"family":"Canaryvalue"}],"colour":"Canaryvalue"}"#,
            "",
            r#"{"resourceType":"Patient","id":"good-2","gender":"male"}"#,
        ]
        .join("\n"),
    )
    .unwrap();

    let run = import(&app, &[&directory]);
    std::fs::remove_dir_all(&directory).ok();
    assert!(!run.success, "a failure makes the exit code non-zero");
    assert_eq!(totals(&run), [2, 0, 0, 1], "{}", run.stdout);
    assert!(
        run.stderr.contains("patients.ndjson:2: 400"),
        "file:line and status: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("Canaryvalue") && !run.stdout.contains("Canaryvalue"));
    app.get_json("Patient/good-1", 200).await;
    app.get_json("Patient/good-2", 200).await;
    app.get_json("Patient/bad-1", 404).await;
    // The failure is in the audit log too, as the operator's.
    assert_eq!(operator_records(&app, 400).await, 1);
}
both_backends!(bad_line, super::a_bad_line_fails_alone);

/// Writes `files` (name, JSON) into a fresh directory.
fn directory_of(files: &[(&str, Value)]) -> PathBuf {
    let directory = std::env::temp_dir().join(format!("custodian-import-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    for (name, content) in files {
        std::fs::write(directory.join(name), content.to_string()).unwrap();
    }
    directory
}

/// Bundles as newer Synthea writes them: a shared bundle creates the Organization with
/// ifNoneExist, patient bundles reference it conditionally. The shared bundle goes first
/// although its name sorts last; collections keep their ids (or get one); a re-run writes
/// nothing.
async fn conditional_references_between_bundles(app: TestApp) {
    let organization = "https://example.org/organizations|42";
    let patient = serde_json::json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:7f1c0a52-0000-4000-8000-000000000001",
             "resource": {"resourceType": "Patient", "gender": "female"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:7f1c0a52-0000-4000-8000-000000000002",
             "resource": {"resourceType": "Encounter", "status": "finished",
                          "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                          "subject": {"reference": "urn:uuid:7f1c0a52-0000-4000-8000-000000000001"},
                          "serviceProvider": {"reference": format!("Organization?identifier={organization}")}},
             "request": {"method": "POST", "url": "Encounter"}}
        ]
    });
    let shared = serde_json::json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{
            "fullUrl": "urn:uuid:7f1c0a52-0000-4000-8000-000000000003",
            "resource": {"resourceType": "Organization", "name": "Example clinic",
                         "identifier": [{"system": "https://example.org/organizations", "value": "42"}]},
            "request": {"method": "POST", "url": "Organization", "ifNoneExist": format!("identifier={organization}")}
        }]
    });
    let collection = serde_json::json!({
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Practitioner", "id": "kept-id", "active": true}},
            {"fullUrl": "urn:uuid:7f1c0a52-0000-4000-8000-000000000004",
             "resource": {"resourceType": "Practitioner", "active": false}}
        ]
    });
    let directory = directory_of(&[
        ("a-patient.json", patient),
        ("c-collection.json", collection),
        ("z-shared.json", shared),
    ]);

    let first = import(&app, &[&directory]);
    assert!(first.success, "{}{}", first.stdout, first.stderr);
    assert_eq!(totals(&first), [5, 0, 0, 0], "{}", first.stdout);
    let organizations = app.get_json("Organization", 200).await;
    let organization_id = organizations["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap();
    let encounters = app.get_json("Encounter", 200).await;
    let encounter = &encounters["entry"][0]["resource"];
    assert_eq!(
        encounter["serviceProvider"]["reference"],
        format!("Organization/{organization_id}")
    );
    app.get_json(encounter["subject"]["reference"].as_str().unwrap(), 200)
        .await;
    app.get_json("Practitioner/kept-id", 200).await;
    assert_eq!(total(&app, "Practitioner").await, 2);

    let before = versions(&app).await;
    let second = import(&app, &[&directory]);
    std::fs::remove_dir_all(&directory).ok();
    assert!(second.success, "{}{}", second.stdout, second.stderr);
    assert_eq!(totals(&second), [0, 0, 5, 0], "{}", second.stdout);
    assert_eq!(versions(&app).await, before);
}
both_backends!(
    conditional_references,
    super::conditional_references_between_bundles
);

/// Patient Bundles are imported concurrently (`--jobs`); when several carry the same `POST`
/// (one `fullUrl`, so one deterministic id), the first to claim it creates it and the others
/// count it as unchanged: one version, no update, as when the files go one after the other.
async fn a_repeated_post_is_created_once_by_concurrent_bundles(app: TestApp) {
    let clinic = "urn:uuid:5d0c7a1e-0000-4000-8000-0000000000aa";
    let bundles: Vec<(String, Value)> = (0..12)
        .map(|copy| {
            let bundle = serde_json::json!({
                "resourceType": "Bundle", "type": "transaction",
                "entry": [
                    {"fullUrl": clinic,
                     "resource": {"resourceType": "Organization", "name": "Shared clinic"},
                     "request": {"method": "POST", "url": "Organization"}},
                    {"fullUrl": format!("urn:uuid:5d0c7a1e-0000-4000-8000-{copy:012}"),
                     "resource": {"resourceType": "Patient", "gender": "other",
                                  "managingOrganization": {"reference": clinic}},
                     "request": {"method": "POST", "url": "Patient"}}
                ]
            });
            (format!("patient-{copy:02}.json"), bundle)
        })
        .collect();
    let files: Vec<(&str, Value)> = bundles
        .iter()
        .map(|(name, bundle)| (name.as_str(), bundle.clone()))
        .collect();
    let directory = directory_of(&files);

    let run = import(&app, &[&directory]);
    std::fs::remove_dir_all(&directory).ok();
    assert!(run.success, "{}{}", run.stdout, run.stderr);
    assert_eq!(totals(&run), [13, 0, 11, 0], "{}", run.stdout);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM resource_versions WHERE resource_type = 'Organization'")
            .await,
        1,
        "one version of the shared Organization"
    );
    // Every patient refers to that one Organization.
    let organization = app.get_json("Organization", 200).await;
    let organization_id = organization["entry"][0]["resource"]["id"].as_str().unwrap();
    let referring = format!("Patient?organization=Organization/{organization_id}");
    assert_eq!(total(&app, &referring).await, 12);
}
both_backends!(
    repeated_post,
    super::a_repeated_post_is_created_once_by_concurrent_bundles
);
