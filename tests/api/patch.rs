//! patch (JSON Patch, RFC 6902): applied to the current version and written like an update
//! (new version, history, search index, audit); every failure writes nothing; callers who cannot
//! see the resource get 404.

use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{spawn_app_with, Backend, TestApp, FHIR_JSON};

const JSON_PATCH: &str = "application/json-patch+json";

fn patient(family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1970-01-01"
    })
}

/// Sends `PATCH /{path}` with a JSON Patch body, as the suite's default caller.
async fn send_patch(app: &TestApp, path: &str, operations: &Value) -> reqwest::Response {
    app.client
        .patch(app.url(path))
        .header("content-type", JSON_PATCH)
        .body(operations.to_string())
        .send()
        .await
        .expect("request")
}

/// The status and OperationOutcome diagnostics of a failed patch.
async fn failure(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let outcome: Value = response.json().await.expect("an OperationOutcome");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let diagnostics = outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, diagnostics)
}

async fn version_count(app: &TestApp, id: &str) -> i64 {
    app.count(&format!(
        "SELECT COUNT(*) FROM resource_versions WHERE resource_id = '{id}'"
    ))
    .await
}

/// Asserts that `id` is still at version 1, unchanged.
async fn unchanged(app: &TestApp, id: &str, original: &Value, label: &str) {
    assert_eq!(version_count(app, id).await, 1, "{label}: nothing written");
    let current = app.get_json(&format!("Patient/{id}"), 200).await;
    assert_eq!(&current, original, "{label}: resource unchanged");
}

async fn replace_add_remove_then_read_back(app: TestApp) {
    let id = app.create_id(&patient("Lovelace")).await;
    let response = send_patch(
        &app,
        &format!("Patient/{id}"),
        &json!([
            {"op": "test", "path": "/name/0/family", "value": "Lovelace"},
            {"op": "replace", "path": "/name/0/family", "value": "Byron"},
            {"op": "add", "path": "/active", "value": true},
            {"op": "add", "path": "/name/0/given/-", "value": "Augusta"},
            {"op": "remove", "path": "/birthDate"}
        ]),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "W/\"2\"");
    assert!(response.headers().contains_key("last-modified"));
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with(FHIR_JSON));
    let patched: Value = response.json().await.unwrap();
    assert_eq!(patched["meta"]["versionId"], "2");
    assert_eq!(patched["name"][0]["family"], "Byron");
    assert_eq!(patched["name"][0]["given"], json!(["Ada", "Augusta"]));
    assert_eq!(patched["active"], true);
    assert!(patched.get("birthDate").is_none());

    let read = app.get_json(&format!("Patient/{id}"), 200).await;
    assert_eq!(read, patched);
    let first = app.get_json(&format!("Patient/{id}/_history/1"), 200).await;
    assert_eq!(first["name"][0]["family"], "Lovelace");
    assert_eq!(first["birthDate"], "1970-01-01");
    let history = app.get_json(&format!("Patient/{id}/_history"), 200).await;
    let versions: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["resource"]["meta"]["versionId"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2", "1"]);

    // Prefer and If-Match work as for update.
    let minimal = app
        .client
        .patch(app.url(&format!("Patient/{id}")))
        .header("content-type", JSON_PATCH)
        .header("if-match", "W/\"2\"")
        .header("prefer", "return=minimal")
        .body(json!([{"op": "replace", "path": "/active", "value": false}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(minimal.status(), 200);
    assert_eq!(minimal.headers()["etag"], "W/\"3\"");
    assert!(minimal.bytes().await.unwrap().is_empty());
    // The audit log records each patch as one "patch" record, in the write's transaction.
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'patch' AND outcome = 200 AND resource_id = '{id}'"
        ))
        .await,
        2
    );
}
both_backends!(replace_add_remove, super::replace_add_remove_then_read_back);

async fn failures_write_nothing(app: TestApp) {
    let id = app.create_id(&patient("Lovelace")).await;
    let original = app.get_json(&format!("Patient/{id}"), 200).await;
    let path = format!("Patient/{id}");

    let stale = app
        .client
        .patch(app.url(&path))
        .header("content-type", JSON_PATCH)
        .header("if-match", "W/\"7\"")
        .body(json!([{"op": "replace", "path": "/gender", "value": "male"}]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(failure(stale).await.0, 412);
    unchanged(&app, &id, &original, "stale If-Match").await;

    let (status, diagnostics) = failure(
        send_patch(
            &app,
            &path,
            &json!([
                {"op": "replace", "path": "/gender", "value": "male"},
                {"op": "test", "path": "/name/0/family", "value": "Somebody-Else"}
            ]),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422);
    assert!(diagnostics.contains("operation 1 (test)"), "{diagnostics}");
    // Values are PHI: the outcome never quotes the patch's or the resource's.
    assert!(!diagnostics.contains("Somebody-Else"), "{diagnostics}");
    assert!(!diagnostics.contains("Lovelace"), "{diagnostics}");
    unchanged(&app, &id, &original, "failing test op").await;

    let (status, diagnostics) = failure(
        send_patch(
            &app,
            &path,
            &json!([{"op": "replace", "path": "/deceasedBoolean", "value": true}]),
        )
        .await,
    )
    .await;
    assert_eq!(status, 422, "replace of a missing element");
    assert!(
        diagnostics.contains("operation 0 (replace)"),
        "{diagnostics}"
    );
    unchanged(&app, &id, &original, "missing path").await;

    for (label, operations) in [
        (
            "gender outside its required value set",
            json!([{"op": "replace", "path": "/gender", "value": "robot"}]),
        ),
        (
            "an unknown element",
            json!([{"op": "add", "path": "/favouriteColour", "value": "blue"}]),
        ),
        (
            "a malformed date",
            json!([{"op": "replace", "path": "/birthDate", "value": "1970-13-45"}]),
        ),
    ] {
        let (status, diagnostics) = failure(send_patch(&app, &path, &operations).await).await;
        assert_eq!(status, 422, "{label}: {diagnostics}");
        assert!(!diagnostics.contains("robot"), "{label}: {diagnostics}");
        assert!(
            !diagnostics.contains("1970-13-45"),
            "{label}: {diagnostics}"
        );
        unchanged(&app, &id, &original, label).await;
    }

    for (label, operations) in [
        (
            "id replaced",
            json!([{"op": "replace", "path": "/id", "value": "another-id"}]),
        ),
        ("id removed", json!([{"op": "remove", "path": "/id"}])),
        (
            "resourceType replaced",
            json!([{"op": "replace", "path": "/resourceType", "value": "Practitioner"}]),
        ),
    ] {
        let (status, _) = failure(send_patch(&app, &path, &operations).await).await;
        assert_eq!(status, 422, "{label}");
        unchanged(&app, &id, &original, label).await;
    }
    assert_eq!(app.get("Patient/another-id").await.status(), 404);

    for (label, body) in [
        ("not an array", json!({"op": "remove", "path": "/gender"})),
        ("unknown op", json!([{"op": "merge", "path": "/gender"}])),
        (
            "path not a JSON Pointer",
            json!([{"op": "remove", "path": "gender"}]),
        ),
    ] {
        let (status, _) = failure(send_patch(&app, &path, &body).await).await;
        assert_eq!(status, 400, "{label}");
        unchanged(&app, &id, &original, label).await;
    }

    for content_type in [
        Some("application/fhir+json"),
        Some("application/json"),
        Some("application/merge-patch+json"),
        None,
    ] {
        let mut request = app
            .client
            .patch(app.url(&path))
            .body(json!([{"op": "replace", "path": "/gender", "value": "male"}]).to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let (status, diagnostics) = failure(request.send().await.unwrap()).await;
        assert_eq!(status, 415, "{content_type:?}");
        assert!(diagnostics.contains(JSON_PATCH), "{diagnostics}");
        unchanged(&app, &id, &original, "wrong content type").await;
    }

    // One audit record per failed request, none of them a write.
    assert!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'patch' AND outcome = 422 AND resource_id = '{id}'"
        ))
        .await
            >= 1
    );
}
both_backends!(failures, super::failures_write_nothing);

/// A patch body over the configured limit is refused with 413 and writes nothing. The limit is
/// lowered so the whole body fits in the socket buffers: with a multi-megabyte body the server's
/// early answer races the client's upload, which then fails with a broken pipe instead of reading
/// the 413.
async fn oversized_patch_is_413(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |settings| settings.max_body_bytes = 4096).await else {
        return;
    };
    let id = app.create_id(&patient("Lovelace")).await;
    let path = format!("Patient/{id}");
    let original = app.get_json(&path, 200).await;
    let oversized = "x".repeat(6 * 1024);
    let (status, diagnostics) = failure(
        send_patch(
            &app,
            &path,
            &json!([{"op": "add", "path": "/name/0/text", "value": oversized}]),
        )
        .await,
    )
    .await;
    assert_eq!(status, 413);
    assert!(diagnostics.contains("4096"), "{diagnostics}");
    unchanged(&app, &id, &original, "too large").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_patch_sqlite() {
    oversized_patch_is_413(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_patch_postgres() {
    oversized_patch_is_413(Backend::Postgres).await;
}

async fn unknown_and_deleted_resources(app: TestApp) {
    let operations = json!([{"op": "replace", "path": "/gender", "value": "male"}]);
    let (status, _) = failure(send_patch(&app, "Patient/nobody", &operations).await).await;
    assert_eq!(status, 404);
    assert_eq!(
        failure(send_patch(&app, "Unicorn/nobody", &operations).await)
            .await
            .0,
        404
    );
    let id = app.create_id(&patient("Lovelace")).await;
    assert_eq!(app.delete(&format!("Patient/{id}")).await.status(), 204);
    let (status, _) = failure(send_patch(&app, &format!("Patient/{id}"), &operations).await).await;
    assert_eq!(status, 410);
    assert_eq!(version_count(&app, &id).await, 2);
}
both_backends!(unknown_and_deleted, super::unknown_and_deleted_resources);

async fn search_finds_the_patched_value(app: TestApp) {
    let id = app.create_id(&patient("Lovelace")).await;
    let found = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|entry| entry["resource"]["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = app.get_json("Patient?family=Lovelace", 200).await;
    assert_eq!(found(&before), std::slice::from_ref(&id));
    let response = send_patch(
        &app,
        &format!("Patient/{id}"),
        &json!([{"op": "replace", "path": "/name/0/family", "value": "Byron"}]),
    )
    .await;
    assert_eq!(response.status(), 200);
    let old = app.get_json("Patient?family=Lovelace", 200).await;
    assert!(found(&old).is_empty(), "the old value no longer matches");
    let new = app.get_json("Patient?family=Byron", 200).await;
    assert_eq!(found(&new), [id]);
}
both_backends!(search_after_patch, super::search_finds_the_patched_value);

fn consent(patient: &str) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]}
    })
}

async fn patch_as(app: &TestApp, token: &str, path: &str, operations: &Value) -> u16 {
    app.anonymous
        .patch(app.url(path))
        .bearer_auth(token)
        .header("content-type", JSON_PATCH)
        .body(operations.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn callers_who_cannot_see_it_get_404(app: TestApp) {
    let first = app
        .create_id(&json!({"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner/doc"}]}))
        .await;
    let second = app.create_id(&patient("Lovelace")).await;
    let own_consent = app.create_id(&consent(&first)).await;
    let other_consent = app.create_id(&consent(&second)).await;
    // A patient may change their own consent decisions (policies/policy.csv), nobody else's.
    let patient_token = app.token(DevTokenRequest {
        subject: "test-patient".into(),
        roles: vec!["patient".into()],
        scope: "launch/patient patient/*.cruds".into(),
        patient: Some(first.clone()),
        fhir_user: Some(format!("Patient/{first}")),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    let withdraw = json!([{"op": "replace", "path": "/status", "value": "inactive"}]);
    assert_eq!(
        patch_as(
            &app,
            &patient_token,
            &format!("Consent/{other_consent}"),
            &withdraw
        )
        .await,
        404
    );
    assert_eq!(version_count(&app, &other_consent).await, 1);
    assert_eq!(
        patch_as(
            &app,
            &patient_token,
            &format!("Consent/{own_consent}"),
            &withdraw
        )
        .await,
        200
    );
    // Moving one's own consent into another patient's compartment is a write outside the
    // caller's reach: 403 (the caller knows what they sent), nothing written.
    let hijack = json!([{"op": "replace", "path": "/patient/reference", "value": format!("Patient/{second}")}]);
    assert_eq!(
        patch_as(
            &app,
            &patient_token,
            &format!("Consent/{own_consent}"),
            &hijack
        )
        .await,
        403
    );
    assert_eq!(version_count(&app, &own_consent).await, 2);

    // A practitioner writes the records of their care team's patients only.
    let doctor = app.token(DevTokenRequest {
        subject: "test-doctor".into(),
        roles: vec!["practitioner".into()],
        scope: "user/*.cruds".into(),
        fhir_user: Some("Practitioner/doc".into()),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    let activate = json!([{"op": "add", "path": "/active", "value": true}]);
    assert_eq!(
        patch_as(&app, &doctor, &format!("Patient/{second}"), &activate).await,
        404
    );
    assert_eq!(version_count(&app, &second).await, 1);
    assert_eq!(
        patch_as(&app, &doctor, &format!("Patient/{first}"), &activate).await,
        200
    );
    // Read-only scopes: the interaction itself is forbidden.
    let reader = app.token(DevTokenRequest {
        subject: "test-reader".into(),
        roles: vec!["ehr-system".into()],
        scope: "system/*.rs".into(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    assert_eq!(
        patch_as(&app, &reader, &format!("Patient/{second}"), &activate).await,
        403
    );
}
both_backends!(authorization, super::callers_who_cannot_see_it_get_404);
