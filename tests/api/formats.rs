//! JSON and XML: content negotiation and equivalence of the two forms.

use serde_json::Value;

use crate::both_backends;
use crate::helpers::{testdata_dir, without_server_fields, TestApp, FHIR_JSON, FHIR_XML};

/// Without the server's fields, and without whitespace in the narrative: fhirbolt's XML writer
/// does not keep whitespace-only text between XHTML tags nor at the edges of text nodes, which
/// changes no content a FHIR client relies on (a known limitation noted in README.md).
fn comparable(resource: Value) -> Value {
    let mut resource = without_server_fields(resource);
    if let Some(Value::String(div)) = resource
        .get_mut("text")
        .and_then(|text| text.get_mut("div"))
    {
        div.retain(|character| !character.is_whitespace());
    }
    resource
}

async fn xml_and_json_are_equivalent(app: TestApp) {
    for example in [
        "Patient-example.json",
        "Observation-example.json",
        "Condition-example.json",
    ] {
        let text =
            std::fs::read_to_string(testdata_dir().join("fhir-r4-examples").join(example)).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        let resource_type = original["resourceType"].as_str().unwrap();
        let id = app.create_id(&original).await;

        // Read the JSON-created resource as XML, post that XML back, read the copy as JSON.
        let xml = app
            .client
            .get(app.url(&format!("{resource_type}/{id}?_format=xml")))
            .send()
            .await
            .unwrap();
        assert_eq!(xml.status(), 200);
        assert!(xml.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(FHIR_XML));
        let xml = xml.text().await.unwrap();
        assert!(
            xml.contains("http://hl7.org/fhir"),
            "{example}: not FHIR XML"
        );
        let copy = app
            .client
            .post(app.url(resource_type))
            .header("content-type", FHIR_XML)
            .header("accept", FHIR_JSON)
            .body(xml)
            .send()
            .await
            .unwrap();
        assert_eq!(
            copy.status(),
            201,
            "{example}: {}",
            copy.text().await.unwrap_or_default()
        );
        let copy: Value = copy.json().await.unwrap();
        assert_eq!(comparable(copy), comparable(original.clone()), "{example}");

        // Accept picks XML when no _format is given.
        let by_accept = app
            .client
            .get(app.url(&format!("{resource_type}/{id}")))
            .header("accept", "application/fhir+xml")
            .send()
            .await
            .unwrap();
        assert!(by_accept.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(FHIR_XML));
    }
    // An unknown _format is 406 with an OperationOutcome.
    let unknown = app.get("metadata?_format=yaml").await;
    assert_eq!(unknown.status(), 406);
}
both_backends!(xml_json_equivalence, super::xml_and_json_are_equivalent);
