//! What the server returns, checked by an independent implementation: the R4 models of PyPI
//! `fhir.resources` 6.1.0 (tests/oracle). scripts/test installs it into `.tools/oracle-venv` and
//! sets `CUSTODIAN_TEST_PYTHON`; without it the test is skipped loudly (a failure when CI=true).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{repo_dir, testdata_dir, TestApp};

/// The oracle's verdicts on `[label, resource]` pairs; `None` when the oracle is not installed.
pub(crate) fn oracle_failures(resources: &[(String, Value)]) -> Option<Vec<String>> {
    let Ok(python) = std::env::var("CUSTODIAN_TEST_PYTHON") else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CUSTODIAN_TEST_PYTHON is not set and CI=true: run the suite with scripts/test");
        }
        eprintln!("\n*** SKIPPING the fhir.resources oracle: CUSTODIAN_TEST_PYTHON is not set (scripts/test sets it) ***\n");
        return None;
    };
    let mut child = Command::new(python)
        .arg(repo_dir().join("tests/oracle/validate_fhir.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the oracle");
    let input = serde_json::to_vec(&resources).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let output = child.wait_with_output().expect("oracle output");
    assert!(output.status.success(), "the oracle crashed");
    Some(serde_json::from_slice(&output.stdout).expect("oracle verdicts"))
}

async fn responses_satisfy_an_independent_validator(app: TestApp) {
    let mut responses: Vec<(String, Value)> = Vec::new();
    for example in [
        "Patient-example.json",
        "Observation-example.json",
        "MedicationRequest-medrx0301.json",
    ] {
        let text =
            std::fs::read_to_string(testdata_dir().join("fhir-r4-examples").join(example)).unwrap();
        let resource: Value = serde_json::from_str(&text).unwrap();
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        let id = app.create_id(&resource).await;
        let mut changed = app.get_json(&format!("{resource_type}/{id}"), 200).await;
        responses.push((format!("read {example}"), changed.clone()));
        changed["meta"]["tag"] = json!([{"system": "urn:test", "code": "changed"}]);
        assert_eq!(
            app.put(&format!("{resource_type}/{id}"), &changed)
                .await
                .status(),
            200
        );
        app.delete(&format!("{resource_type}/{id}")).await;
        responses.push((
            format!("instance history {example}"),
            app.get_json(&format!("{resource_type}/{id}/_history"), 200)
                .await,
        ));
    }
    responses.push((
        "system history".into(),
        app.get_json("_history?_count=3", 200).await,
    ));
    responses.push((
        "CapabilityStatement".into(),
        app.get_json("metadata", 200).await,
    ));
    let error = app
        .create(&json!({"resourceType": "Patient", "birthDate": "1990-02-30"}))
        .await;
    responses.push(("OperationOutcome".into(), error.json().await.unwrap()));
    responses.push((
        "404 OperationOutcome".into(),
        app.get_json("Patient/nobody", 404).await,
    ));

    // A known-invalid resource proves the oracle is awake: it must reject exactly that one.
    responses.push((
        "control".into(),
        json!({"resourceType": "Patient", "birthDate": "1990-13-01"}),
    ));
    if let Some(mut failures) = oracle_failures(&responses) {
        let control = failures
            .iter()
            .position(|failure| failure.starts_with("control:"));
        assert!(control.is_some(), "the oracle accepted an invalid resource");
        failures.remove(control.unwrap_or_default());
        assert!(
            failures.is_empty(),
            "fhir.resources rejects:\n{}",
            failures.join("\n")
        );
    }
}
both_backends!(
    independent_validation,
    super::responses_satisfy_an_independent_validator
);
