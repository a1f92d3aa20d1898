//! History at instance, type and system level: Bundle shape, order, `_since`, and paging that
//! stays correct while data changes.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::TestApp;

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|link| link["relation"] == "next")
        .map(|link| link["url"].as_str().unwrap().to_string())
}

async fn follow(app: &TestApp, url: &str) -> Value {
    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

async fn paging_survives_concurrent_writes(app: TestApp) {
    let mut created = BTreeSet::new();
    for index in 0..5 {
        let id = app
            .create_id(&json!({"resourceType": "Organization", "name": format!("Org {index}")}))
            .await;
        created.insert(id);
    }
    let mut seen = BTreeSet::new();
    let mut page = app.get_json("Organization/_history?_count=2", 200).await;
    assert_eq!(page["type"], "history");
    let mut pages = 0;
    loop {
        pages += 1;
        for entry in page["entry"].as_array().unwrap() {
            assert_eq!(entry["request"]["method"], "POST");
            assert_eq!(entry["response"]["status"], "201 Created");
            assert!(entry["fullUrl"]
                .as_str()
                .unwrap()
                .starts_with(&app.base_url));
            seen.insert(entry["resource"]["id"].as_str().unwrap().to_string());
        }
        // A write between pages must not shift or repeat what the next pages hold.
        app.create_id(&json!({"resourceType": "Organization", "name": "Late"}))
            .await;
        match next_link(&page) {
            Some(url) => page = follow(&app, &url).await,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);

    // System level sees other types too, newest first.
    app.create_id(&json!({"resourceType": "Practitioner", "active": true}))
        .await;
    let system = app.get_json("_history?_count=1", 200).await;
    assert_eq!(
        system["entry"][0]["resource"]["resourceType"],
        "Practitioner"
    );
    assert!(next_link(&system).is_some());

    // _since excludes older versions.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let empty = app
        .get_json(&format!("Organization/_history?_since={future}"), 200)
        .await;
    assert_eq!(empty["entry"].as_array().unwrap().len(), 0);
    assert_eq!(
        app.get("Organization/_history?_since=soon").await.status(),
        400
    );
    assert_eq!(app.get("Patient/nobody/_history").await.status(), 404);
}
both_backends!(history_paging, super::paging_survives_concurrent_writes);
