//! Round trip of every official R4 example (../shared/testdata/fhir-r4-examples, not written by
//! this project): create, then read returns the same content apart from `id` and `meta`'s
//! server fields. Bundles are excluded (they are transactions, tested in their own issue).
//! The test fails below 100 % of the examples of served types; any exclusion is listed here.

use serde_json::Value;

use crate::both_backends;
use crate::helpers::{testdata_dir, without_server_fields, TestApp, FHIR_JSON};

/// Examples not expected to round-trip, with the reason. Empty: every example must pass.
const EXCLUDED: &[(&str, &str)] = &[];

async fn every_official_example_round_trips(app: TestApp) {
    let directory = testdata_dir().join("fhir-r4-examples");
    let mut files: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.ends_with(".json") && !name.starts_with("Bundle-")
        })
        .collect();
    files.sort();
    assert!(
        files.len() > 250,
        "expected the full example set, found {}",
        files.len()
    );

    let mut failures = Vec::new();
    let mut passed = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if EXCLUDED.iter().any(|(excluded, _)| *excluded == name) {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        let resource_type = original["resourceType"].as_str().unwrap().to_string();
        let created = app
            .client
            .post(app.url(&resource_type))
            .header("content-type", FHIR_JSON)
            .body(text)
            .send()
            .await
            .unwrap();
        if created.status() != 201 {
            let status = created.status();
            failures.push(format!(
                "{name}: create {status}: {}",
                created.text().await.unwrap()
            ));
            continue;
        }
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let read = app.get_json(&format!("{resource_type}/{id}"), 200).await;
        if without_server_fields(read) == without_server_fields(original) {
            passed += 1;
        } else {
            failures.push(format!("{name}: read differs from what was created"));
        }
    }
    eprintln!(
        "official examples ({:?}): {passed} of {} round-trip",
        app.backend,
        files.len() - EXCLUDED.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
both_backends!(official_examples, super::every_official_example_round_trips);
