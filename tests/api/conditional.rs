//! Conditional create (If-None-Exist), update and delete on `_id` and `identifier`.

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{TestApp, FHIR_JSON};

fn patient_with_mrn(mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": mrn}],
        "active": true
    })
}

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

async fn conditional_create_is_idempotent(app: TestApp) {
    let resource = patient_with_mrn("A-1");
    let first = post_if_none_exist(&app, &resource, "identifier=urn:test:mrn|A-1").await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    for _ in 0..3 {
        let again = post_if_none_exist(&app, &resource, "identifier=urn:test:mrn|A-1").await;
        assert_eq!(again.status(), 200);
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["meta"]["versionId"], "1");
    }
    let count = app
        .count("SELECT COUNT(*) FROM resource_versions WHERE resource_type = 'Patient'")
        .await;
    assert_eq!(count, 1, "repeats wrote nothing");

    // Another system with the same value is a different identifier.
    let other =
        post_if_none_exist(&app, &patient_with_mrn("A-1"), "identifier=urn:other|A-1").await;
    assert_eq!(other.status(), 201);
    // Now a bare value matches both: 412, nothing written.
    let ambiguous = post_if_none_exist(&app, &resource, "identifier=A-1").await;
    assert_eq!(ambiguous.status(), 412);
    let outcome: Value = ambiguous.json().await.unwrap();
    assert_eq!(outcome["issue"][0]["code"], "multiple-matches");
    // Unsupported criteria are refused, not ignored.
    let unsupported = post_if_none_exist(&app, &resource, "no-such-parameter=Doe").await;
    assert_eq!(unsupported.status(), 400);
    let count = app
        .count("SELECT COUNT(*) FROM resource_versions WHERE resource_type = 'Patient'")
        .await;
    assert_eq!(count, 2);
}
both_backends!(conditional_create, super::conditional_create_is_idempotent);

async fn conditional_update_creates_then_updates(app: TestApp) {
    let first = app
        .put(
            "Patient?identifier=urn:test:mrn|U-1",
            &patient_with_mrn("U-1"),
        )
        .await;
    assert_eq!(first.status(), 201);
    let id = first.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut changed = patient_with_mrn("U-1");
    changed["active"] = json!(false);
    let second = app
        .put("Patient?identifier=urn:test:mrn|U-1", &changed)
        .await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(second["id"], id.as_str());
    assert_eq!(second["meta"]["versionId"], "2");
    assert_eq!(second["active"], false);

    // By _id too; a body id that contradicts the match is refused.
    let by_id = app.put(&format!("Patient?_id={id}"), &changed).await;
    assert_eq!(by_id.status(), 200);
    let mut wrong_id = changed.clone();
    wrong_id["id"] = json!("someone-else");
    assert_eq!(
        app.put(&format!("Patient?_id={id}"), &wrong_id)
            .await
            .status(),
        400
    );

    app.create_id(&patient_with_mrn("U-2")).await;
    app.create_id(&patient_with_mrn("U-2")).await;
    let ambiguous = app
        .put(
            "Patient?identifier=urn:test:mrn|U-2",
            &patient_with_mrn("U-2"),
        )
        .await;
    assert_eq!(ambiguous.status(), 412);
}
both_backends!(
    conditional_update,
    super::conditional_update_creates_then_updates
);

async fn conditional_delete_removes_a_single_match(app: TestApp) {
    let id = app.create_id(&patient_with_mrn("D-1")).await;
    app.create_id(&patient_with_mrn("D-2")).await;
    app.create_id(&patient_with_mrn("D-2")).await;

    assert_eq!(
        app.delete("Patient?identifier=urn:test:mrn|D-2")
            .await
            .status(),
        412
    );
    assert_eq!(
        app.delete("Patient?identifier=urn:test:mrn|D-1")
            .await
            .status(),
        204
    );
    app.get_json(&format!("Patient/{id}"), 410).await;
    // No match: nothing to do.
    assert_eq!(
        app.delete("Patient?identifier=urn:test:mrn|nobody")
            .await
            .status(),
        204
    );
    // Without criteria a conditional delete would match everything: refused.
    assert_eq!(app.delete("Patient").await.status(), 400);
    // SQL metacharacters are data, never SQL.
    assert_eq!(
        app.delete("Patient?identifier=x'%20OR%20'1'='1")
            .await
            .status(),
        204
    );
    let live = app
        .count(
            "SELECT COUNT(*) FROM resource_heads WHERE resource_type = 'Patient' AND deleted = 0",
        )
        .await;
    assert_eq!(live, 2);
}
both_backends!(
    conditional_delete,
    super::conditional_delete_removes_a_single_match
);
