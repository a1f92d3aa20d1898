//! `GET /metadata`, `/health`, `/ready`: the CapabilityStatement claims exactly what works.

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{TestApp, FHIR_XML};

async fn capability_statement_matches_behaviour(app: TestApp) {
    let statement = app.get_json("metadata", 200).await;
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let resources = statement["rest"][0]["resource"].as_array().unwrap();
    let patient = resources
        .iter()
        .find(|resource| resource["type"] == "Patient")
        .unwrap();
    let interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|interaction| interaction["code"].as_str().unwrap())
        .collect();
    assert!(interactions.contains(&"vread") && interactions.contains(&"history-type"));
    assert!(interactions.contains(&"search-type"));
    // Every declared search parameter of Patient is accepted by the server (none is ignored
    // and reported), and each claimed reference parameter is a valid _include.
    let parameters: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|parameter| parameter["name"].as_str().unwrap())
        .collect();
    for name in [
        "name",
        "birthdate",
        "identifier",
        "general-practitioner",
        "organization",
    ] {
        assert!(parameters.contains(&name), "{name} is declared");
    }
    for name in &parameters {
        let value = match *name {
            "birthdate" | "death-date" => "2000-01-01",
            "general-practitioner" | "organization" | "link" => "Practitioner/x",
            _ => "x",
        };
        let bundle = app
            .get_json(&format!("Patient?{name}={value}&_count=1"), 200)
            .await;
        let outcome = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|entry| entry["search"]["mode"] == "outcome");
        assert!(!outcome, "declared parameter {name} was ignored");
    }
    for include in patient["searchInclude"].as_array().unwrap() {
        let include = include.as_str().unwrap();
        app.get_json(&format!("Patient?_include={include}&_count=1"), 200)
            .await;
    }
    // AuditEvent: read and search by compliance roles, never written through the API.
    let audit_event = resources
        .iter()
        .find(|resource| resource["type"] == "AuditEvent")
        .unwrap();
    let audit_interactions: Vec<&str> = audit_event["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|interaction| interaction["code"].as_str().unwrap())
        .collect();
    assert_eq!(audit_interactions, ["read", "search-type"]);

    // Every claimed type accepts create and read (a minimal resource of a few types).
    for resource_type in ["Organization", "Practitioner", "Location", "Basic"] {
        assert!(resources
            .iter()
            .any(|resource| resource["type"] == resource_type));
        let mut resource = json!({ "resourceType": resource_type });
        if resource_type == "Basic" {
            resource["code"] = json!({"text": "note"});
        }
        let id = app.create_id(&resource).await;
        app.get_json(&format!("{resource_type}/{id}"), 200).await;
    }

    let xml = app
        .client
        .get(app.url("metadata"))
        .header("accept", FHIR_XML)
        .send()
        .await
        .unwrap();
    assert_eq!(xml.status(), 200);
    assert!(xml.text().await.unwrap().contains("<CapabilityStatement"));
}
both_backends!(
    capability_statement,
    super::capability_statement_matches_behaviour
);

async fn health_and_readiness(app: TestApp) {
    assert_eq!(app.get_json("health", 200).await["status"], "up");
    let ready: Value = app.get_json("ready", 200).await;
    assert_eq!(ready["status"], "ready");
}
both_backends!(health, super::health_and_readiness);
