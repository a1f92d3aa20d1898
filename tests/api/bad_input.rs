//! Bad input: each a clear OperationOutcome with the right status, and nothing written.

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{spawn_app_with, Backend, TestApp, FHIR_JSON, FHIR_XML};

async fn post_raw(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(FHIR_JSON),
        "errors are FHIR JSON"
    );
    (status, response.json().await.expect("an OperationOutcome"))
}

fn first_issue(outcome: &Value) -> (&str, Option<&str>) {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    (
        outcome["issue"][0]["code"].as_str().unwrap(),
        outcome["issue"][0]["expression"][0].as_str(),
    )
}

async fn nothing_written(app: &TestApp) {
    assert_eq!(app.count("SELECT COUNT(*) FROM resource_versions").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM resource_heads").await, 0);
}

async fn malformed_documents_are_400(app: TestApp) {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "truncated JSON",
            br#"{"resourceType":"Patient","name":[{"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            b"{\"resourceType\":\"Patient\",\"gender\":\"\xff\xfe\"}".to_vec(),
        ),
        ("deep nesting", {
            let mut deep = br#"{"resourceType":"Patient","extension":"#.to_vec();
            deep.extend("[".repeat(10_000).as_bytes());
            deep.extend("]".repeat(10_000).as_bytes());
            deep.push(b'}');
            deep
        }),
        ("not an object", b"[1,2,3]".to_vec()),
        ("no resourceType", br#"{"name":[]}"#.to_vec()),
    ];
    for (case, body) in cases {
        let (status, outcome) = post_raw(&app, "Patient", FHIR_JSON, body).await;
        assert_eq!(status, 400, "{case}: {outcome}");
        first_issue(&outcome);
    }
    let deep_xml = format!(
        "<Patient xmlns=\"http://hl7.org/fhir\">{}{}</Patient>",
        "<extension url=\"http://x\">".repeat(10_000),
        "</extension>".repeat(10_000)
    );
    let (status, _) = post_raw(&app, "Patient", FHIR_XML, deep_xml.into_bytes()).await;
    assert_eq!(status, 400);
    let (status, _) = post_raw(
        &app,
        "Patient",
        FHIR_XML,
        b"<Patient><unclosed></Patient>".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    nothing_written(&app).await;
}
both_backends!(malformed_documents, super::malformed_documents_are_400);

async fn invalid_content_is_located(app: TestApp) {
    let cases = [
        (
            json!({"resourceType": "Patient", "name": [{"family": "Doe", "nickname": "Secret"}]}),
            "Patient.name[0].nickname",
        ),
        (
            json!({"resourceType": "Patient", "active": "yes"}),
            "Patient.active",
        ),
        (
            json!({"resourceType": "Patient", "birthDate": "1990-13-01"}),
            "Patient.birthDate",
        ),
        (
            json!({"resourceType": "Patient", "birthDate": "1990-02-30"}),
            "Patient.birthDate",
        ),
        (
            json!({"resourceType": "Patient", "gender": "robot"}),
            "Patient.gender",
        ),
        // A repeating element as a single object, a single-valued one as an array (fuzzing:
        // both were stored as sent, unlike the same resource sent as XML).
        (
            json!({"resourceType": "Patient", "name": {"family": "Secret"}}),
            "Patient.name",
        ),
        (
            json!({"resourceType": "Patient", "gender": ["female"]}),
            "Patient.gender",
        ),
        (
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "effectiveDateTime": "2020-01-01T10:00:00"}),
            "Observation.effectiveDateTime",
        ),
        // A narrative that is not one well-formed div could be stored but never served as XML
        // (found by fuzzing resource_json).
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><b>Secret</div>"}}),
            "Patient.text.div",
        ),
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Secret"}}),
            "Patient.text.div",
        ),
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<p xmlns=\"http://www.w3.org/1999/xhtml\">Secret</p>"}}),
            "Patient.text.div",
        ),
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w6.org/1999/xhtml\">Secret</div>"}}),
            "Patient.text.div",
        ),
        // Attributes must be well-formed, on the div and inside it.
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"mA>Secret</div>"}}),
            "Patient.text.div",
        ),
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p class=\"a\" class=\"b\">Secret</p></div>"}}),
            "Patient.text.div",
        ),
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><br clear/>Secret</div>"}}),
            "Patient.text.div",
        ),
        // FHIR JSON has no empty arrays (found by fuzzing: answered 500).
        (
            json!({"resourceType": "Patient", "meta": {"security": []}, "gender": "male"}),
            "Patient.meta.security",
        ),
        // A byte order mark before the div would not survive the XML form.
        (
            json!({"resourceType": "Patient", "text": {"status": "generated",
                   "div": "\u{feff}<div xmlns=\"http://www.w3.org/1999/xhtml\">Secret</div>"}}),
            "Patient.text.div",
        ),
    ];
    for (resource, location) in cases {
        let resource_type = resource["resourceType"].as_str().unwrap();
        let (status, outcome) = post_raw(
            &app,
            resource_type,
            FHIR_JSON,
            resource.to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, 400, "{resource}: {outcome}");
        let (_, expression) = first_issue(&outcome);
        assert_eq!(expression, Some(location), "{outcome}");
        // The offending value is never echoed back (it may be PHI).
        assert!(!outcome.to_string().contains("Secret"));
        assert!(!outcome.to_string().contains("robot"));
    }

    // resourceType must match the URL; the id in an update must match the URL.
    let (status, outcome) = post_raw(
        &app,
        "Observation",
        FHIR_JSON,
        json!({"resourceType": "Patient"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(first_issue(&outcome).1, Some("resourceType"));
    let mismatched = app
        .put(
            "Patient/url-id",
            &json!({"resourceType": "Patient", "id": "body-id"}),
        )
        .await;
    assert_eq!(mismatched.status(), 400);
    let missing = app
        .put("Patient/url-id", &json!({"resourceType": "Patient"}))
        .await;
    assert_eq!(missing.status(), 400);
    nothing_written(&app).await;
}
both_backends!(invalid_content, super::invalid_content_is_located);

async fn protocol_errors_have_their_status(app: TestApp) {
    let patient = json!({"resourceType": "Patient"}).to_string().into_bytes();
    let (status, outcome) = post_raw(&app, "Patient", "text/plain", patient.clone()).await;
    assert_eq!(status, 415);
    assert_eq!(first_issue(&outcome).0, "not-supported");
    let (status, _) = post_raw(&app, "Spaceship", FHIR_JSON, patient.clone()).await;
    assert_eq!(status, 404);
    let (status, _) = post_raw(&app, "OperationOutcome", FHIR_JSON, patient.clone()).await;
    assert_eq!(status, 404);
    let response = app.delete("metadata").await;
    assert_eq!(response.status(), 405);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(first_issue(&outcome).0, "not-supported");
    assert_eq!(app.get("no/such/endpoint/here").await.status(), 404);
    nothing_written(&app).await;
}
both_backends!(protocol_errors, super::protocol_errors_have_their_status);

async fn oversized_bodies_are_413_before_being_read(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |settings| settings.max_body_bytes = 4096).await else {
        return;
    };
    let mut patient = json!({"resourceType": "Patient", "name": [{"text": "x".repeat(10_000)}]});
    let (status, outcome) =
        post_raw(&app, "Patient", FHIR_JSON, patient.to_string().into_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(first_issue(&outcome).0, "too-costly");
    // Streamed without a Content-Length: stopped at the limit all the same.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 1024])).collect();
    let streamed = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    patient["name"][0]["text"] = json!("small");
    let (status, _) = post_raw(&app, "Patient", FHIR_JSON, patient.to_string().into_bytes()).await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn oversized_bodies_sqlite() {
    oversized_bodies_are_413_before_being_read(Backend::Sqlite).await;
}

#[tokio::test]
async fn oversized_bodies_postgres() {
    oversized_bodies_are_413_before_being_read(Backend::Postgres).await;
}
