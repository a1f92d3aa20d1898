//! Per-client request budgets through the real server: the budget headers, 429 with
//! `Retry-After` and an OperationOutcome once a client's burst is spent, other clients
//! unaffected, recovery after the delay, the flood of bad tokens throttled per address, and
//! every refused request still audited.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{ehr_system, spawn_app_with, Backend, TestApp};

/// A server whose clients may send one request every 2 s with a burst of 3, and 2 bad-token
/// requests per address before 429 (slow rates, so that a loaded machine cannot refill a budget
/// between two requests of a test).
async fn throttled_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |settings| {
        settings.rate_limit.client_per_sec = 0.5;
        settings.rate_limit.client_burst = 3;
        settings.rate_limit.unauthenticated_per_sec = 0.5;
        settings.rate_limit.unauthenticated_burst = 2;
    })
    .await
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
}

async fn audited(app: &TestApp, outcome: u16) -> i64 {
    app.count(&format!(
        "SELECT COUNT(*) FROM audit_records WHERE outcome = {outcome}"
    ))
    .await
}

async fn a_client_over_its_budget_is_told_when_to_retry(app: TestApp) {
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let response = app.get("Patient?_count=1").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit").as_deref(), Some("3"));
        remaining.push(header(&response, "x-ratelimit-remaining").unwrap());
        let reset: u64 = header(&response, "x-ratelimit-reset")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=6).contains(&reset), "reset {reset}");
    }
    assert_eq!(remaining, ["2", "1", "0"]);

    let refused = app.get("Patient?_count=1").await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "retry after {retry_after}");
    assert_eq!(
        header(&refused, "x-ratelimit-remaining").as_deref(),
        Some("0")
    );
    let outcome: Value = refused.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "throttled");

    // Another client of the same issuer has its own budget.
    let other = app.token(custodian::authz::dev::DevTokenRequest {
        subject: "second-ehr".into(),
        ..ehr_system()
    });
    let response = app
        .anonymous
        .get(app.url("Patient?_count=1"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // After the delay the first client is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(app.get("Patient?_count=1").await.status(), 200);

    // The refusal was audited like any other answer.
    assert_eq!(audited(&app, 429).await, 1);
}

async fn a_flood_of_bad_tokens_is_throttled_per_address(app: TestApp) {
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = app
            .anonymous
            .get(app.url("Patient"))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 429, 429]);
    // A client with a valid token from the same address is not affected.
    assert_eq!(app.get("Patient?_count=1").await.status(), 200);
    assert_eq!(audited(&app, 401).await, 2);
    assert_eq!(audited(&app, 429).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_budget_sqlite() {
    let app = throttled_app(Backend::Sqlite).await.expect("SQLite runs");
    a_client_over_its_budget_is_told_when_to_retry(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_budget_postgres() {
    if let Some(app) = throttled_app(Backend::Postgres).await {
        a_client_over_its_budget_is_told_when_to_retry(app).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_flood_sqlite() {
    let app = throttled_app(Backend::Sqlite).await.expect("SQLite runs");
    a_flood_of_bad_tokens_is_throttled_per_address(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_flood_postgres() {
    if let Some(app) = throttled_app(Backend::Postgres).await {
        a_flood_of_bad_tokens_is_throttled_per_address(app).await;
    }
}
