//! create, read, vread, update (and update-as-create), delete, If-Match, Prefer, compartments.

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{TestApp, FHIR_JSON};

fn patient(family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": format!("mrn-{family}")}],
        "name": [{"family": family, "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1970-01-01"
    })
}

fn without_server_fields(mut resource: Value) -> Value {
    let object = resource.as_object_mut().unwrap();
    object.remove("id");
    object.remove("meta");
    resource
}

async fn create_read_update_delete(app: TestApp) {
    let created = app.create(&patient("Lovelace")).await;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(created.headers()["etag"], "W/\"1\"");
    assert!(created.headers().contains_key("last-modified"));
    assert!(created.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with(FHIR_JSON));
    let body: Value = created.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(location, app.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(body["meta"]["versionId"], "1");
    assert!(body["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));

    let read = app.get(&format!("Patient/{id}")).await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["etag"], "W/\"1\"");
    let read: Value = read.json().await.unwrap();
    assert_eq!(read, body);
    assert_eq!(without_server_fields(read), patient("Lovelace"));

    let mut changed = body.clone();
    changed["name"][0]["family"] = json!("Byron");
    let updated = app.put(&format!("Patient/{id}"), &changed).await;
    assert_eq!(updated.status(), 200);
    assert_eq!(updated.headers()["etag"], "W/\"2\"");
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["name"][0]["family"], "Byron");

    let first = app.get_json(&format!("Patient/{id}/_history/1"), 200).await;
    assert_eq!(first["name"][0]["family"], "Lovelace");

    let deleted = app.delete(&format!("Patient/{id}")).await;
    assert_eq!(deleted.status(), 204);
    assert_eq!(deleted.headers()["etag"], "W/\"3\"");
    let gone = app.get_json(&format!("Patient/{id}"), 410).await;
    assert_eq!(gone["resourceType"], "OperationOutcome");
    assert_eq!(gone["issue"][0]["code"], "deleted");
    // Earlier versions stay readable; the deletion's own version is 410.
    app.get_json(&format!("Patient/{id}/_history/1"), 200).await;
    app.get_json(&format!("Patient/{id}/_history/2"), 200).await;
    app.get_json(&format!("Patient/{id}/_history/3"), 410).await;
    app.get_json(&format!("Patient/{id}/_history/4"), 404).await;
    // Deleting again writes nothing.
    assert_eq!(app.delete(&format!("Patient/{id}")).await.status(), 204);
    let history = app.get_json(&format!("Patient/{id}/_history"), 200).await;
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);

    // A deleted resource can be brought back by an update: version 4.
    let revived = app.put(&format!("Patient/{id}"), &changed).await;
    assert_eq!(revived.status(), 200);
    assert_eq!(revived.headers()["etag"], "W/\"4\"");
    app.get_json(&format!("Patient/{id}"), 200).await;

    app.get_json("Patient/never-existed", 404).await;
    assert_eq!(app.delete("Patient/never-existed").await.status(), 404);
}
both_backends!(
    create_read_update_delete_work,
    super::create_read_update_delete
);

async fn update_as_create_uses_the_client_id(app: TestApp) {
    let mut resource = patient("Client");
    resource["id"] = json!("client-chosen-1");
    let first = app.put("Patient/client-chosen-1", &resource).await;
    assert_eq!(first.status(), 201);
    assert_eq!(
        first.headers()["location"].to_str().unwrap(),
        app.url("Patient/client-chosen-1/_history/1")
    );
    let second = app.put("Patient/client-chosen-1", &resource).await;
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["etag"], "W/\"2\"");
}
both_backends!(update_as_create, super::update_as_create_uses_the_client_id);

async fn if_match_rejects_stale_versions_and_races_have_one_winner(app: TestApp) {
    let id = app.create_id(&patient("Race")).await;
    let current = app.get_json(&format!("Patient/{id}"), 200).await;

    let stale = app
        .client
        .put(app.url(&format!("Patient/{id}")))
        .header("content-type", FHIR_JSON)
        .header("if-match", "W/\"7\"")
        .body(current.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);

    // Eight writers all claim version 1: exactly one may win.
    let mut writers = Vec::new();
    for writer in 0..8 {
        let client = app.client.clone();
        let url = app.url(&format!("Patient/{id}"));
        let mut body = current.clone();
        body["name"][0]["family"] = json!(format!("Writer{writer}"));
        writers.push(tokio::spawn(async move {
            client
                .put(url)
                .header("content-type", FHIR_JSON)
                .header("if-match", "W/\"1\"")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for writer in writers {
        statuses.push(writer.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412, 412, 412, 412, 412, 412, 412]);
    let after = app.get_json(&format!("Patient/{id}"), 200).await;
    assert_eq!(after["meta"]["versionId"], "2");
    let history = app.get_json(&format!("Patient/{id}/_history"), 200).await;
    assert_eq!(history["entry"].as_array().unwrap().len(), 2);

    // Without If-Match, concurrent updates all succeed, each on its own version.
    let mut writers = Vec::new();
    for _ in 0..6 {
        let client = app.client.clone();
        let url = app.url(&format!("Patient/{id}"));
        let body = after.clone();
        writers.push(tokio::spawn(async move {
            client
                .put(url)
                .header("content-type", FHIR_JSON)
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for writer in writers {
        assert_eq!(writer.await.unwrap(), 200);
    }
    let last = app.get_json(&format!("Patient/{id}"), 200).await;
    assert_eq!(last["meta"]["versionId"], "8");
}
both_backends!(
    if_match_and_races,
    super::if_match_rejects_stale_versions_and_races_have_one_winner
);

async fn prefer_header_shapes_the_response(app: TestApp) {
    let minimal = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(patient("Minimal").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(minimal.status(), 201);
    assert!(minimal.headers().contains_key("location"));
    assert!(minimal.text().await.unwrap().is_empty());

    let outcome = app
        .client
        .post(app.url("Patient"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=OperationOutcome")
        .body(patient("Outcome").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(outcome.status(), 201);
    let outcome: Value = outcome.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["severity"], "information");
}
both_backends!(prefer_return, super::prefer_header_shapes_the_response);

async fn rows_carry_the_patient_compartment_pseudonym(app: TestApp) {
    let patient_id = app.create_id(&patient("Compartment")).await;
    let observation = json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "heart rate"},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "valueQuantity": {"value": 72, "unit": "/min"}
    });
    let observation_id = app.create_id(&observation).await;
    let organization_id = app
        .create_id(&json!({"resourceType": "Organization", "name": "Clinic"}))
        .await;

    let compartment_of = |resource_type: &str, id: &str| {
        format!(
            "SELECT compartment FROM resource_versions WHERE resource_type = '{resource_type}' AND resource_id = '{id}'"
        )
    };
    let patient_rows = app.strings(&compartment_of("Patient", &patient_id)).await;
    let observation_rows = app
        .strings(&compartment_of("Observation", &observation_id))
        .await;
    let organization_rows = app
        .strings(&compartment_of("Organization", &organization_id))
        .await;
    let pseudonym = patient_rows[0]
        .clone()
        .expect("a Patient is in its own compartment");
    assert_eq!(observation_rows, [Some(pseudonym.clone())]);
    assert_eq!(organization_rows, [None]);
    assert_ne!(
        pseudonym, patient_id,
        "the row holds a pseudonym, not the patient's id"
    );
    assert!(uuid::Uuid::parse_str(&pseudonym).is_ok());
}
both_backends!(
    compartments,
    super::rows_carry_the_patient_compartment_pseudonym
);
