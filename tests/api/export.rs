//! Bulk Data `$export`: kick-off → poll → download at each level, for each role, with `_type`
//! and `_since`; consent applies; jobs belong to their requester, can be cancelled, expire, and
//! survive a restart; the output is ciphertext at rest. Every exported line is checked by the
//! fhir.resources oracle.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::authz::{caller, patient_caller, practitioner_caller};
use crate::both_backends;
use crate::encryption::{canary_patient, contains, database_bytes, encodings, CANARY};
use crate::helpers::{spawn_app_with, testdata_dir, Backend, TestApp, FHIR_JSON};
use crate::oracle::oracle_failures;

/// Three of the Synthea patient bundles (each with its own Organization and Practitioner).
const BUNDLES: [&str; 3] = [
    "Liz_Conn_27c911c6-f045-4ffa-af5d-6eba57ac94b2.json",
    "Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json",
    "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json",
];

/// One loaded patient: their id and the `Type/id` of every resource of their compartment.
struct LoadedPatient {
    id: String,
    compartment: BTreeSet<String>,
}

/// The resource types of the patient compartment, read from the definition the server loads.
fn compartment_types() -> BTreeSet<String> {
    let path = crate::helpers::repo_dir().join("fhir-profiles/patient-compartment.json");
    let definition: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut types: BTreeSet<String> = definition["referencePaths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    types.insert("Patient".into());
    types
}

/// Loads the bundles as transactions; every stored `Type/id`, and each patient's compartment.
async fn load_synthea(app: &TestApp) -> (BTreeSet<String>, Vec<LoadedPatient>) {
    let in_compartment = compartment_types();
    let mut all = BTreeSet::new();
    let mut patients = Vec::new();
    for name in BUNDLES {
        let path = testdata_dir().join("synthea-r4-bundles").join(name);
        let bundle: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let response = app
            .client
            .post(app.url("/"))
            .header("content-type", FHIR_JSON)
            .body(bundle.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}");
        let response: Value = response.json().await.unwrap();
        let mut patient = LoadedPatient {
            id: String::new(),
            compartment: BTreeSet::new(),
        };
        for entry in response["entry"].as_array().unwrap() {
            let location = entry["response"]["location"].as_str().unwrap();
            let key: Vec<&str> = location.split('/').take(2).collect();
            let key = key.join("/");
            let resource_type = key.split('/').next().unwrap().to_string();
            if resource_type == "Patient" {
                patient.id = key["Patient/".len()..].to_string();
            }
            if in_compartment.contains(&resource_type) {
                patient.compartment.insert(key.clone());
            }
            all.insert(key);
        }
        patients.push(patient);
    }
    (all, patients)
}

/// Kicks off an export with `token` (GET `path`); the status URL.
async fn kick_off(app: &TestApp, token: &str, path: &str) -> String {
    let response = app
        .anonymous
        .get(app.url(path))
        .bearer_auth(token)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let location = response
        .headers()
        .get("content-location")
        .map(|value| value.to_str().unwrap().to_string());
    assert_eq!(status, 202, "{path}: {}", response.text().await.unwrap());
    let location = location.expect("Content-Location");
    assert!(location.starts_with(&format!("{}/_export/", app.base_url)));
    location
}

async fn call(app: &TestApp, token: &str, method: &str, url: &str) -> reqwest::Response {
    app.anonymous
        .request(method.parse().unwrap(), url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Polls until the job ends; the manifest (200) or the failure (500 OperationOutcome).
async fn wait(app: &TestApp, token: &str, status_url: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let response = call(app, token, "GET", status_url).await;
        let status = response.status().as_u16();
        if status != 202 {
            return (status, response.json().await.unwrap());
        }
        assert!(response.headers().contains_key("x-progress"));
        assert!(response.headers().contains_key("retry-after"));
        assert!(Instant::now() < deadline, "the export did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every line of every output file, checked: the file's type, valid NDJSON, and the oracle.
async fn download(app: &TestApp, token: &str, manifest: &Value) -> Vec<Value> {
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].is_string());
    assert!(manifest["request"].as_str().unwrap().contains("$export"));
    let mut lines = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        let response = call(app, token, "GET", output["url"].as_str().unwrap()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "application/fhir+ndjson"
        );
        let text = response.text().await.unwrap();
        let file: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one resource per line"))
            .collect();
        assert_eq!(file.len() as u64, output["count"].as_u64().unwrap());
        assert!(file
            .iter()
            .all(|line| line["resourceType"] == output["type"]));
        lines.extend(file);
    }
    let labelled: Vec<(String, Value)> = lines
        .iter()
        .map(|line| {
            (
                format!("{}/{}", line["resourceType"], line["id"]),
                line.clone(),
            )
        })
        .collect();
    if let Some(failures) = oracle_failures(&labelled) {
        assert!(failures.is_empty(), "oracle: {failures:?}");
    }
    lines
}

/// Kick-off, wait, download: the lines.
async fn export(app: &TestApp, token: &str, path: &str) -> Vec<Value> {
    let status_url = kick_off(app, token, path).await;
    let (status, manifest) = wait(app, token, &status_url).await;
    assert_eq!(status, 200, "{manifest}");
    download(app, token, &manifest).await
}

fn keys(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|line| {
            format!(
                "{}/{}",
                line["resourceType"].as_str().unwrap(),
                line["id"].as_str().unwrap()
            )
        })
        .collect()
}

/// Equal sets, or a message naming what is missing and what is extra.
#[track_caller]
fn assert_same(actual: &BTreeSet<String>, expected: &BTreeSet<String>, label: &str) {
    let missing: Vec<_> = expected.difference(actual).collect();
    let extra: Vec<_> = actual.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{label}: missing {missing:?}, extra {extra:?}"
    );
}

fn union<'a>(sets: impl IntoIterator<Item = &'a BTreeSet<String>>) -> BTreeSet<String> {
    sets.into_iter().flatten().cloned().collect()
}

async fn export_levels_roles_and_filters(app: TestApp) {
    let ehr = app.token(caller("ehr-system", "system/*.rs"));
    let (mut all, mut patients) = load_synthea(&app).await;

    // A Group of the first two patients.
    let group = app
        .create_id(
            &json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": format!("Patient/{}", patients[0].id)}},
                       {"entity": {"reference": format!("Patient/{}", patients[1].id)}}]}),
        )
        .await;
    all.insert(format!("Group/{group}"));
    // The R4 patient compartment holds a Group through `member`: it is stored in its first
    // member's compartment.
    patients[0].compartment.insert(format!("Group/{group}"));

    // Practitioner doc is the general practitioner of the first two patients; the second one
    // denies doc by Consent.
    for patient in &patients[..2] {
        let path = format!("Patient/{}", patient.id);
        let mut resource = app.get_json(&path, 200).await;
        resource["generalPractitioner"] = json!([{"reference": "Practitioner/doc"}]);
        assert_eq!(app.put(&path, &resource).await.status(), 200);
    }
    let second = app.token(DevTokenRequest {
        scope: "launch/patient patient/*.cruds".into(),
        ..patient_caller(&patients[1].id)
    });
    let consent = json!({
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{}", patients[1].id)},
        "dateTime": "2026-01-01T00:00:00Z",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "deny", "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
            "reference": {"reference": "Practitioner/doc"}}]}
    });
    let response = app
        .anonymous
        .post(app.url("Consent"))
        .bearer_auth(&second)
        .header("content-type", FHIR_JSON)
        .body(consent.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let consent: Value = response.json().await.unwrap();
    let consent_key = format!("Consent/{}", consent["id"].as_str().unwrap());
    all.insert(consent_key.clone());
    patients[1].compartment.insert(consent_key.clone());

    // The EHR system: everything at system level; every compartment at Patient level; the
    // members' compartments for the Group.
    let system = export(&app, &ehr, "$export").await;
    assert_same(&keys(&system), &all, "system");
    assert_eq!(system.len(), all.len(), "each resource once");
    let every_compartment = union(patients.iter().map(|patient| &patient.compartment));
    assert_same(
        &keys(&export(&app, &ehr, "Patient/$export").await),
        &every_compartment,
        "Patient level",
    );
    assert_same(
        &keys(&export(&app, &ehr, &format!("Group/{group}/$export")).await),
        &union([&patients[0].compartment, &patients[1].compartment]),
        "Group",
    );

    // _type, and _outputFormat spelled as the spec allows.
    let typed = export(
        &app,
        &ehr,
        "$export?_type=Patient,Condition&_outputFormat=ndjson",
    )
    .await;
    let expected: BTreeSet<String> = all
        .iter()
        .filter(|key| key.starts_with("Patient/") || key.starts_with("Condition/"))
        .cloned()
        .collect();
    assert!(expected.len() > 3);
    assert_same(&keys(&typed), &expected, "_type");

    // _since: only what changed after it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let condition = patients
        .iter()
        .flat_map(|patient| &patient.compartment)
        .find(|key| key.starts_with("Condition/"))
        .unwrap()
        .clone();
    let mut changed = app.get_json(&condition, 200).await;
    changed["clinicalStatus"]["text"] = json!("reviewed");
    assert_eq!(app.put(&condition, &changed).await.status(), 200);
    let recent = export(
        &app,
        &ehr,
        &format!("$export?_since={}", urlencoding_of(&since)),
    )
    .await;
    assert_eq!(keys(&recent), BTreeSet::from([condition]));

    // The practitioner: the care team's patients only, and not the one whose Consent denies.
    let doc = app.token(practitioner_caller("doc"));
    let seen = keys(&export(&app, &doc, "Patient/$export").await);
    // Of the denying patient, only the directive itself: Consents are never hidden by consent
    // (the care team must know what the patient decided).
    let doc_sees = union([
        &patients[0].compartment,
        &BTreeSet::from([consent_key.clone()]),
    ]);
    assert_same(&seen, &doc_sees, "practitioner");
    assert_eq!(
        seen.intersection(&patients[1].compartment)
            .collect::<Vec<_>>(),
        vec![&consent_key]
    );
    // … and a Group naming a denied patient still leaves that patient out.
    assert_same(
        &keys(&export(&app, &doc, &format!("Group/{group}/$export")).await),
        &doc_sees,
        "practitioner's Group",
    );

    // The data subject: their own compartment, and who accessed it (doc read it just now).
    assert_eq!(
        call(
            &app,
            &doc,
            "GET",
            &app.url(&format!("Patient/{}", patients[0].id))
        )
        .await
        .status(),
        200
    );
    let own = app.token(patient_caller(&patients[0].id));
    let lines = export(&app, &own, "Patient/$export").await;
    let (disclosures, data): (Vec<Value>, Vec<Value>) = lines
        .into_iter()
        .partition(|line| line["resourceType"] == "AuditEvent");
    assert_same(&keys(&data), &patients[0].compartment, "data subject");
    assert!(
        disclosures
            .iter()
            .any(|event| event.to_string().contains("test-practitioner")),
        "the practitioner's read is in the disclosure lines"
    );
    assert!(
        !disclosures
            .iter()
            .any(|event| event.to_string().contains(&patients[1].id)),
        "nothing of another patient"
    );
    // A patient's system-level export is confined to their compartment as well.
    let confined = keys(&export(&app, &own, "$export?_type=Patient,Observation").await);
    assert!(confined.contains(&format!("Patient/{}", patients[0].id)));
    assert!(confined.is_subset(&patients[0].compartment));
}
both_backends!(
    levels_roles_and_filters,
    super::export_levels_roles_and_filters
);

fn urlencoding_of(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

async fn export_kick_off_is_checked_and_jobs_are_private(app: TestApp) {
    let ehr = app.token(caller("ehr-system", "system/*.rs"));
    app.create_id(&canary_patient(0)).await;
    // Kick-off without respond-async, with a non-NDJSON format, an unknown type: 400.
    let plain = app
        .anonymous
        .get(app.url("$export"))
        .bearer_auth(&ehr)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    for path in [
        "$export?_outputFormat=text/csv",
        "$export?_type=Nonsense",
        "$export?_since=soon",
    ] {
        let response = app
            .anonymous
            .get(app.url(path))
            .bearer_auth(&ehr)
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let outcome: Value = response.json().await.unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    // A caller who may search nothing of a type asked for: 403.
    let auditor = app.token(caller("compliance-officer", "user/AuditEvent.rs"));
    let refused = app
        .anonymous
        .get(app.url("$export?_type=Patient"))
        .bearer_auth(&auditor)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    // The CapabilityStatement declares $export at each level.
    let statement = app.get_json("metadata", 200).await;
    let definitions = |operations: &Value| -> Vec<String> {
        operations
            .as_array()
            .into_iter()
            .flatten()
            .map(|operation| operation["definition"].as_str().unwrap().to_string())
            .collect()
    };
    let bulk = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/";
    assert!(definitions(&statement["rest"][0]["operation"]).contains(&format!("{bulk}export")));
    for (resource_type, definition) in [("Patient", "patient-export"), ("Group", "group-export")] {
        let resource = statement["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|resource| resource["type"] == resource_type)
            .unwrap();
        assert!(
            definitions(&resource["operation"]).contains(&format!("{bulk}{definition}")),
            "{resource_type} declares {definition}"
        );
    }

    // POST kick-off with a Parameters body.
    let response = app
        .anonymous
        .post(app.url("$export"))
        .bearer_auth(&ehr)
        .header("prefer", "respond-async")
        .header("content-type", FHIR_JSON)
        .body(
            json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Patient"},
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let (status, manifest) = wait(&app, &ehr, &status_url).await;
    assert_eq!(status, 200);
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_string();

    // Another caller, even with the same role and scopes: as if the job did not exist.
    let intruder = app.token(DevTokenRequest {
        subject: "someone-else".into(),
        ..caller("ehr-system", "system/*.rs")
    });
    let practitioner = app.token(practitioner_caller("doc"));
    for token in [&intruder, &practitioner] {
        for (method, url) in [
            ("GET", &status_url),
            ("GET", &file_url),
            ("DELETE", &status_url),
        ] {
            assert_eq!(
                call(&app, token, method, url).await.status(),
                404,
                "{method} {url}"
            );
        }
    }
    assert_eq!(call(&app, &ehr, "GET", &file_url).await.status(), 200);

    // Cancel: 202, then the job and its output are gone.
    assert_eq!(call(&app, &ehr, "DELETE", &status_url).await.status(), 202);
    assert_eq!(call(&app, &ehr, "GET", &status_url).await.status(), 404);
    assert_eq!(call(&app, &ehr, "GET", &file_url).await.status(), 404);
    assert_eq!(app.count("SELECT COUNT(*) FROM export_chunks").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM export_jobs").await, 0);

    // The audit records the kick-off, polls, download and cancel as operations.
    let operations = app
        .count("SELECT COUNT(*) FROM audit_records WHERE interaction = 'operation'")
        .await;
    assert!(operations >= 5, "{operations}");
}
both_backends!(
    kick_off_and_privacy,
    super::export_kick_off_is_checked_and_jobs_are_private
);

macro_rules! with_settings {
    ($name:ident, $test:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $test(crate::helpers::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $test(crate::helpers::Backend::Postgres).await;
            }
        }
    };
}

async fn export_expires(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |settings| {
        settings.export.retention_secs = 1;
        settings.export.poll_ms = 100;
    })
    .await
    else {
        return;
    };
    let ehr = app.token(caller("ehr-system", "system/*.rs"));
    app.create_id(&canary_patient(0)).await;
    let status_url = kick_off(&app, &ehr, "$export").await;
    let (status, _) = wait(&app, &ehr, &status_url).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(call(&app, &ehr, "GET", &status_url).await.status(), 404);
    // The sweeper deletes the job and its output.
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.count("SELECT COUNT(*) FROM export_chunks").await > 0 {
        assert!(Instant::now() < deadline, "expired output was not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM export_jobs").await, 0);
}
with_settings!(expiry, super::export_expires);

async fn export_survives_a_restart_and_is_ciphertext_at_rest(backend: Backend) {
    // A node that runs no jobs: kick-offs stay queued.
    let Some(app) = spawn_app_with(backend, |settings| settings.export.worker = false).await else {
        return;
    };
    let ehr = app.token(caller("ehr-system", "system/*.rs"));
    let mut canaries = BTreeSet::new();
    for index in 0..3 {
        canaries.insert(format!(
            "Patient/{}",
            app.create_id(&canary_patient(index)).await
        ));
    }
    let resumed = kick_off(&app, &ehr, "$export?_type=Patient").await;
    let doomed = kick_off(&app, &ehr, "$export?_type=Patient").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let queued = call(&app, &ehr, "GET", &resumed).await;
    assert_eq!(queued.status(), 202);
    assert!(queued.headers()["x-progress"]
        .to_str()
        .unwrap()
        .starts_with("queued"));
    // As if a node had been running both jobs and stopped: leases run out, partial output left
    // behind; the second job has been started as often as allowed.
    let job_of = |url: &str| url.rsplit('/').next().unwrap().to_string();
    for (url, attempts) in [(&resumed, 1), (&doomed, 3)] {
        app.execute(&format!(
            "UPDATE export_jobs SET status = 'running', lease_owner = 'stopped-node', \
             lease_until_us = 1, attempts = {attempts} WHERE job_id = '{}'",
            job_of(url)
        ))
        .await;
    }
    let junk = match backend {
        Backend::Sqlite => "X'00'",
        Backend::Postgres => "'\\x00'::bytea",
    };
    app.execute(&format!(
        "INSERT INTO export_chunks (tenant, job_id, chunk_no, resource_type, compartment, key_id, \
         line_count, body) VALUES ('default', '{}', 0, 'Patient', NULL, 'none', 1, {junk})",
        job_of(&resumed)
    ))
    .await;
    let old_base = app.base_url.clone();
    let app = app.restart(|_| {}).await;
    let resumed = resumed.replace(&old_base, &app.base_url);
    let doomed = doomed.replace(&old_base, &app.base_url);
    // Tokens name the server's URL as audience: the same caller, a token for the new address.
    let ehr = app.token(caller("ehr-system", "system/*.rs"));
    let (status, manifest) = wait(&app, &ehr, &resumed).await;
    assert_eq!(status, 200, "{manifest}");
    let lines = download(&app, &ehr, &manifest).await;
    assert_eq!(
        keys(&lines),
        canaries,
        "restarted from scratch: no partial output"
    );
    assert!(lines.iter().any(|line| line.to_string().contains(CANARY)));
    let (status, outcome) = wait(&app, &ehr, &doomed).await;
    assert_eq!(status, 500);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(outcome.to_string().contains("interrupted too often"));

    // The output, the job's request and the requester's claims are ciphertext at rest.
    assert!(app.count("SELECT COUNT(*) FROM export_chunks").await > 0);
    let bytes = database_bytes(&app);
    for form in encodings(CANARY) {
        assert!(
            !contains(&bytes, &form),
            "canary in the {backend:?} database"
        );
    }
    assert!(
        !contains(&bytes, b"_type=Patient"),
        "the job's request in clear"
    );
}
with_settings!(
    restart,
    super::export_survives_a_restart_and_is_ciphertext_at_rest
);
