//! `Patient/$everything` over a Synthea patient loaded as the transaction Bundle it comes in:
//! exactly the patient's compartment (computed here from the Bundle, independently of the
//! server's compartment rules), per role, over every page, filtered by `_type`, `_since` and
//! `end`, and every resource valid for the `fhir.resources` oracle.

use std::collections::{BTreeMap, BTreeSet};

use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::authz::caller;
use crate::both_backends;
use crate::bundle::{located, post, response_entries, status_of, synthea_bundles};
use crate::helpers::TestApp;
use crate::oracle::oracle_failures;

/// The Synthea patient the tests load (besides the shared hospitals and practitioners).
const PATIENT_FILE: &str = "Alberto_Atencio";

/// A Synthea patient as loaded.
pub(crate) struct SyntheaPatient {
    /// The Patient's id.
    pub id: String,
    /// `Type/id` of every resource of the patient's compartment: the Patient and every entry
    /// of its Bundle that refers to it.
    pub compartment: BTreeSet<String>,
}

/// Whether `value` holds a reference to `target` anywhere.
fn refers_to(value: &Value, target: &str) -> bool {
    match value {
        Value::Object(object) => {
            object.get("reference").and_then(Value::as_str) == Some(target)
                || object.values().any(|child| refers_to(child, target))
        }
        Value::Array(items) => items.iter().any(|item| refers_to(item, target)),
        _ => false,
    }
}

/// Loads the shared hospitals and practitioners and one patient's Bundle through `POST /`.
pub(crate) async fn load_synthea_patient(app: &TestApp) -> SyntheaPatient {
    let mut patient = None;
    for (name, bundle) in synthea_bundles() {
        let is_patient_file = name.starts_with(PATIENT_FILE);
        let shared = name.starts_with("hospital") || name.starts_with("practitioner");
        if !is_patient_file && !shared {
            continue;
        }
        let (status, response) = post(app, &bundle).await;
        assert_eq!(status, 200, "{name}: {response}");
        if !is_patient_file {
            continue;
        }
        let entries = bundle["entry"].as_array().unwrap();
        let answers = response_entries(&response, "transaction", entries.len());
        let patient_url = entries
            .iter()
            .find(|entry| entry["resource"]["resourceType"] == "Patient")
            .and_then(|entry| entry["fullUrl"].as_str())
            .expect("the Bundle's Patient")
            .to_string();
        let mut id = String::new();
        let mut compartment = BTreeSet::new();
        for (entry, answer) in entries.iter().zip(answers) {
            assert!(status_of(answer).starts_with("20"), "{answer}");
            let (key, _) = located(answer);
            if entry["resource"]["resourceType"] == "Patient" {
                id = key.trim_start_matches("Patient/").to_string();
                compartment.insert(key);
            } else if refers_to(&entry["resource"], &patient_url) {
                compartment.insert(key);
            }
        }
        patient = Some(SyntheaPatient { id, compartment });
    }
    let patient = patient.expect("the Synthea patient's Bundle");
    assert!(patient.compartment.len() > 50, "a typical Synthea patient");
    patient
}

/// Every page of `$everything` from `path` (following `next`): the Bundles, and the `Type/id`
/// of the matches and of the included resources.
async fn all_pages(
    app: &TestApp,
    token: &str,
    path: &str,
) -> (Vec<Value>, Vec<String>, BTreeSet<String>) {
    let mut url = app.url(path);
    let mut bundles = Vec::new();
    let mut matches = Vec::new();
    let mut included = BTreeSet::new();
    for _ in 0..100 {
        let response = app
            .anonymous
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        let bundle: Value = response.json().await.unwrap();
        assert_eq!(bundle["type"], "searchset");
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let key = format!(
                "{}/{}",
                resource["resourceType"].as_str().unwrap(),
                resource["id"].as_str().unwrap()
            );
            assert_eq!(
                entry["fullUrl"],
                app.url(&key),
                "fullUrl of {key} is its absolute URL"
            );
            match entry["search"]["mode"].as_str() {
                Some("match") => matches.push(key),
                Some("include") => {
                    included.insert(key);
                }
                other => panic!("unexpected search mode {other:?}"),
            }
        }
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|link| link["relation"] == "next")
            .and_then(|link| link["url"].as_str())
            .map(str::to_string);
        bundles.push(bundle);
        match next {
            Some(next) => url = next,
            None => return (bundles, matches, included),
        }
    }
    panic!("more than 100 pages");
}

fn types_of(keys: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for key in keys {
        *counts
            .entry(key.split('/').next().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

async fn everything_returns_the_compartment_per_role(app: TestApp) {
    let patient = load_synthea_patient(&app).await;
    // Another patient, whose record must never show up.
    let other = app
        .create_id(&json!({"resourceType": "Patient", "gender": "female"}))
        .await;
    app.create_id(&json!({"resourceType": "Observation", "status": "final",
        "code": {"text": "other"}, "subject": {"reference": format!("Patient/{other}")}}))
        .await;
    // A care team that puts Practitioner/on-team on the patient's team.
    let care_team = app
        .create_id(&json!({"resourceType": "CareTeam", "status": "active",
            "subject": {"reference": format!("Patient/{}", patient.id)},
            "participant": [{"member": {"reference": "Practitioner/on-team"}}]}))
        .await;
    let mut expected = patient.compartment.clone();
    expected.insert(format!("CareTeam/{care_team}"));
    let path = format!("Patient/{}/$everything", patient.id);

    // ehr-system: the whole compartment, and the shared resources it refers to.
    let ehr = app.token(crate::helpers::ehr_system());
    let (bundles, matches, included) = all_pages(&app, &ehr, &path).await;
    let unique: BTreeSet<String> = matches.iter().cloned().collect();
    assert_eq!(unique.len(), matches.len(), "no resource twice");
    assert_eq!(unique, expected, "exactly the patient's compartment");
    assert!(
        !included.is_empty(),
        "the Organizations and Practitioners referred to"
    );
    for key in &included {
        let kind = key.split('/').next().unwrap();
        assert!(
            ["Organization", "Practitioner", "Location", "Medication"].contains(&kind),
            "{key} is a shared resource"
        );
        assert_eq!(app.get(key).await.status(), 200, "{key} exists");
    }
    // Every included resource is referred to by a match of its own page.
    for bundle in &bundles {
        let text = bundle.to_string();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            if entry["search"]["mode"] == "include" {
                let key = format!(
                    "{}/{}",
                    entry["resource"]["resourceType"].as_str().unwrap(),
                    entry["resource"]["id"].as_str().unwrap()
                );
                assert!(text.contains(&format!("\"reference\":\"{key}\"")), "{key}");
            }
        }
    }

    // Paging: _count=10 gives pages of at most 10, and together the same set.
    let (small_pages, paged, _) = all_pages(&app, &ehr, &format!("{path}?_count=10")).await;
    assert_eq!(small_pages.len(), expected.len().div_ceil(10));
    for page in &small_pages {
        let shown = page["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|entry| entry["search"]["mode"] == "match")
            .count();
        assert!(shown <= 10);
    }
    assert_eq!(paged.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(paged.len(), expected.len());
    assert!(
        small_pages[0].get("total").is_none(),
        "no total for a partial first page"
    );
    let one_page = app.get_json(&format!("{path}?_count=500"), 200).await;
    assert_eq!(one_page["total"], expected.len());

    // _type: only those types.
    let (_, typed, _) = all_pages(&app, &ehr, &format!("{path}?_type=Observation,Condition")).await;
    let typed: BTreeSet<String> = typed.into_iter().collect();
    let wanted: BTreeSet<String> = expected
        .iter()
        .filter(|key| key.starts_with("Observation/") || key.starts_with("Condition/"))
        .cloned()
        .collect();
    assert_eq!(typed, wanted);

    // _since: only what changed since.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let changed = expected
        .iter()
        .find(|key| key.starts_with("Observation/"))
        .unwrap()
        .clone();
    let mut observation = app.get_json(&changed, 200).await;
    observation["status"] = json!("amended");
    assert_eq!(app.put(&changed, &observation).await.status(), 200);
    let (_, recent, _) = all_pages(
        &app,
        &ehr,
        &format!(
            "{path}?_since={}",
            form_urlencoded::byte_serialize(since.as_bytes()).collect::<String>()
        ),
    )
    .await;
    assert_eq!(recent, vec![changed.clone()]);

    // end: nothing with a care date after it; resources without one (the Patient) stay.
    let (_, early, _) = all_pages(&app, &ehr, &format!("{path}?end=1900-01-01")).await;
    assert!(early.contains(&format!("Patient/{}", patient.id)));
    assert!(
        early
            .iter()
            .all(|key| !key.starts_with("Observation/") && !key.starts_with("Encounter/")),
        "{early:?}"
    );
    let (_, late, _) = all_pages(&app, &ehr, &format!("{path}?start=1900-01-01")).await;
    assert_eq!(late.len(), expected.len(), "every care date is after 1900");

    // A practitioner on the care team sees the same; one off it sees nothing (404).
    let on_team = app.token(DevTokenRequest {
        fhir_user: Some("Practitioner/on-team".into()),
        ..caller("practitioner", "user/*.cruds")
    });
    let (_, seen, seen_included) = all_pages(&app, &on_team, &path).await;
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(seen_included, included);
    let off_team = app.token(DevTokenRequest {
        fhir_user: Some("Practitioner/off-team".into()),
        ..caller("practitioner", "user/*.cruds")
    });
    let status = app
        .anonymous
        .get(app.url(&path))
        .bearer_auth(&off_team)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404, "outside the practitioner's reach");

    // The patient: their own compartment, and (per policy) none of the shared resources.
    let own = app.token(DevTokenRequest {
        patient: Some(patient.id.clone()),
        fhir_user: Some(format!("Patient/{}", patient.id)),
        ..caller("patient", "launch/patient patient/*.rs")
    });
    let (_, mine, mine_included) = all_pages(&app, &own, &path).await;
    assert_eq!(mine.into_iter().collect::<BTreeSet<_>>(), expected);
    assert!(mine_included.is_empty(), "{mine_included:?}");
    let status = app
        .anonymous
        .get(app.url(&format!("Patient/{other}/$everything")))
        .bearer_auth(&own)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404, "another patient's record");
    // A caller with no read scope on Patient: 403.
    let no_patient_reads = app.token(caller("ehr-system", "system/Observation.rs"));
    let status = app
        .anonymous
        .get(app.url(&path))
        .bearer_auth(&no_patient_reads)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403);

    // Every resource and Bundle is valid R4 for an independent implementation.
    let mut checked: Vec<(String, Value)> = Vec::new();
    for (index, bundle) in bundles.iter().chain(small_pages.iter()).enumerate() {
        checked.push((format!("page {index}"), bundle.clone()));
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            checked.push((format!("page {index} entry"), entry["resource"].clone()));
        }
    }
    checked.push((
        "OperationDefinition".into(),
        app.get_json("OperationDefinition/erase", 200).await,
    ));
    if let Some(failures) = oracle_failures(&checked) {
        assert!(
            failures.is_empty(),
            "fhir.resources rejects:\n{}",
            failures.join("\n")
        );
    }
    assert!(types_of(&expected).len() > 5, "{:?}", types_of(&expected));
}
both_backends!(
    everything_per_role,
    super::everything_returns_the_compartment_per_role
);

async fn the_capability_statement_declares_both_operations(app: TestApp) {
    let metadata = app.get_json("metadata", 200).await;
    let patient = metadata["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|resource| resource["type"] == "Patient")
        .unwrap()
        .clone();
    let operations: BTreeMap<String, String> = patient["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|operation| {
            (
                operation["name"].as_str().unwrap().to_string(),
                operation["definition"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        operations["everything"],
        "http://hl7.org/fhir/OperationDefinition/Patient-everything"
    );
    // The server serves the definition it declares, without a token (like /metadata).
    let erase = &operations["erase"];
    assert_eq!(erase, &app.url("OperationDefinition/erase"));
    let response = app.anonymous.get(erase).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let definition: Value = response.json().await.unwrap();
    assert_eq!(definition["resourceType"], "OperationDefinition");
    assert_eq!(definition["code"], "erase");
    assert_eq!(definition["url"], erase.as_str());
    assert_eq!(definition["instance"], true);
    assert_eq!(
        app.anonymous
            .get(app.url("OperationDefinition/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Only the definition itself is open: deeper paths need a token like everything else.
    assert_eq!(
        app.anonymous
            .get(app.url("OperationDefinition/erase/_history"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // Unknown operations and wrong methods.
    let id = app.create_id(&json!({"resourceType": "Patient"})).await;
    assert_eq!(
        app.get(&format!("Patient/{id}/$nothing")).await.status(),
        404
    );
    assert_eq!(app.get(&format!("Patient/{id}/$erase")).await.status(), 405);
    assert_eq!(
        app.client
            .post(app.url(&format!("Patient/{id}/$everything")))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
}
both_backends!(
    operations_declared,
    super::the_capability_statement_declares_both_operations
);
