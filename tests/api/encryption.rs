//! Envelope encryption as seen from outside: no PHI in clear anywhere in the database (canary
//! scan of the raw SQLite files and a pg_dump), ciphertexts bound to their rows, and key rotation
//! that keeps data readable after the old KEK is gone.

use std::process::Command;

use base64::Engine;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{repo_dir, Backend, TestApp};

/// A string that appears nowhere but in the resources this test writes.
pub(crate) const CANARY: &str = "Qzv7Canary";

pub(crate) fn canary_patient(index: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{CANARY} narrative {index}</div>")},
        "identifier": [{"system": "urn:oid:1.2.3", "value": format!("{CANARY}-MRN-{index}")}],
        "name": [{"family": format!("{CANARY}Family{index}"), "given": [format!("{CANARY}Given")]}],
        "telecom": [{"system": "email", "value": format!("{CANARY}{index}@example.org")}, {"system": "phone", "value": format!("{CANARY}-555-{index}")}],
        "address": [{"line": [format!("{index} {CANARY} Street")], "city": format!("{CANARY}ville"), "postalCode": "99999"}],
        "birthDate": "1901-02-03"
    })
}

/// Forms in which a canary could leak: clear, hex, base64 at each of the three alignments.
pub(crate) fn encodings(canary: &str) -> Vec<Vec<u8>> {
    let mut forms = vec![canary.as_bytes().to_vec()];
    let hex: String = canary.bytes().map(|byte| format!("{byte:02x}")).collect();
    forms.push(hex.clone().into_bytes());
    forms.push(hex.to_uppercase().into_bytes());
    for offset in 0..3 {
        let padded = format!("{}{canary}", "x".repeat(offset));
        let encoded = base64::engine::general_purpose::STANDARD.encode(padded.as_bytes());
        // Keep the 4-character groups made only of canary bytes: not the prefix, not padding.
        let first_group = offset.div_ceil(3);
        let last_group = padded.len() / 3;
        let stable = &encoded[4 * first_group..4 * last_group];
        forms.push(stable.as_bytes().to_vec());
    }
    forms
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Every byte the database holds: the SQLite file with its WAL and shared memory, or a full
/// pg_dump of the PostgreSQL database.
pub(crate) fn database_bytes(app: &TestApp) -> Vec<u8> {
    match app.backend {
        Backend::Sqlite => {
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let file = app.data_dir().join(format!("custodian.db{suffix}"));
                if !file.exists() {
                    continue;
                }
                // Read by another process: closing a file this process opened would drop every
                // POSIX lock the process holds on it — the in-process server's SQLite locks —
                // and a `custodian` command started later would then take the database for
                // unused, reset its shared memory and crash this process (SIGBUS).
                let output = Command::new("cat").arg(&file).output().expect("run cat");
                assert!(output.status.success(), "cat {}", file.display());
                bytes.extend(output.stdout);
            }
            assert!(bytes.len() > 4096, "the SQLite files were read");
            bytes
        }
        Backend::Postgres => {
            let output = Command::new("pg_dump")
                .arg("--data-only")
                .arg(&app.database_url)
                .output()
                .expect("run pg_dump");
            assert!(
                output.status.success(),
                "pg_dump failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        }
    }
}

async fn no_phi_in_clear_anywhere(app: TestApp) {
    let mut ids = Vec::new();
    for index in 0..3 {
        ids.push(app.create_id(&canary_patient(index)).await);
    }
    // Updates and history versions too, and a resource in the patient's compartment.
    let mut updated = app.get_json(&format!("Patient/{}", ids[0]), 200).await;
    updated["name"][0]["given"] = json!([format!("{CANARY}Updated")]);
    assert_eq!(
        app.put(&format!("Patient/{}", ids[0]), &updated)
            .await
            .status(),
        200
    );
    let observation = json!({
        "resourceType": "Observation", "status": "final",
        "code": {"text": format!("{CANARY} finding")},
        "subject": {"reference": format!("Patient/{}", ids[1]), "display": format!("{CANARY}Family1")},
        "valueString": format!("{CANARY} value")
    });
    app.create_id(&observation).await;
    // The data reads back in clear through the API …
    let read = app.get_json(&format!("Patient/{}", ids[2]), 200).await;
    assert!(read.to_string().contains(CANARY));
    // … and the database never holds it in clear, hex or base64.
    let bytes = database_bytes(&app);
    // The search index folds case and accents: the folded canary must not be there either.
    for form in encodings(CANARY)
        .iter()
        .chain(encodings(&CANARY.to_lowercase()).iter())
        .chain(encodings("1901-02-03").iter())
    {
        assert!(
            !contains(&bytes, form),
            "found {:?} in the {:?} database",
            String::from_utf8_lossy(form),
            app.backend
        );
    }
    assert!(
        contains(&bytes, ids[0].as_bytes()),
        "the scan sees the rows (ids are not PHI)"
    );
}
both_backends!(canary_scan, super::no_phi_in_clear_anywhere);

async fn a_ciphertext_moved_to_another_row_fails_closed(app: TestApp) {
    let first = app.create_id(&canary_patient(1)).await;
    let second = app
        .create_id(&json!({"resourceType": "Organization", "name": "Acme"}))
        .await;
    let third = app
        .create_id(&json!({"resourceType": "Organization", "name": "Other"}))
        .await;
    // Two rows of the same type and key (the tenant's key): only the binding differs.
    let swap = format!(
        "UPDATE resource_versions SET body = (SELECT body FROM resource_versions WHERE resource_id = '{third}') \
         WHERE resource_id = '{second}'"
    );
    app.execute(&swap).await;
    let tampered = app.get(&format!("Organization/{second}")).await;
    assert_eq!(tampered.status(), 500);
    let body = tampered.text().await.unwrap();
    assert!(
        !body.contains("Other") && !body.contains("Acme"),
        "nothing of either row leaks: {body}"
    );
    // A version moved to another version number of the same resource fails as well.
    let mut again = app.get_json(&format!("Patient/{first}"), 200).await;
    again["active"] = json!(true);
    app.put(&format!("Patient/{first}"), &again).await;
    let replay = format!(
        "UPDATE resource_versions SET body = (SELECT body FROM resource_versions WHERE resource_id = '{first}' AND version_id = 1) \
         WHERE resource_id = '{first}' AND version_id = 2"
    );
    app.execute(&replay).await;
    assert_eq!(app.get(&format!("Patient/{first}")).await.status(), 500);
    assert_eq!(
        app.get(&format!("Patient/{first}/_history/1"))
            .await
            .status(),
        200
    );
    // A body with no data key is never served as plaintext.
    let unsealed =
        format!("UPDATE resource_versions SET key_id = NULL WHERE resource_id = '{third}'");
    app.execute(&unsealed).await;
    assert_eq!(
        app.get(&format!("Organization/{third}")).await.status(),
        500
    );
}
both_backends!(
    ciphertext_swap,
    super::a_ciphertext_moved_to_another_row_fails_closed
);

pub(crate) fn custodian(app: &TestApp, arguments: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_custodian"))
        .args(arguments)
        .env("CUSTODIAN_DATA_DIR", app.data_dir())
        .env("CUSTODIAN_DATABASE_URL", &app.database_url)
        .env("CUSTODIAN_PROFILES_DIR", repo_dir().join("fhir-profiles"))
        .env("CUSTODIAN_AUDIT__CATALOG_DIR", repo_dir().join("audit"))
        .env("CUSTODIAN_LOG", "warn")
        .output()
        .expect("run custodian");
    assert!(
        output.status.success(),
        "custodian {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn rotation_rewraps_without_losing_data(app: TestApp) {
    let patient = app.create_id(&canary_patient(1)).await;
    let organization = app
        .create_id(&json!({"resourceType": "Organization", "name": "Before rotation"}))
        .await;
    let bodies_before = app.count("SELECT COUNT(*) FROM resource_versions").await;
    let status = custodian(&app, &["keys", "status"]);
    assert!(status.contains("local:1: 2"), "{status}");

    let rotated = custodian(&app, &["keys", "rotate"]);
    assert!(
        rotated.contains("re-wrapped 2 data keys under local:2"),
        "{rotated}"
    );
    let status = custodian(&app, &["keys", "status"]);
    assert!(
        status.contains("local:2: 2") && !status.contains("local:1:"),
        "{status}"
    );
    custodian(&app, &["keys", "retire", "local:1"]);
    assert!(!app.data_dir().join("keys/local-kek-v1.key").exists());
    assert_eq!(
        app.count("SELECT COUNT(*) FROM resource_versions").await,
        bodies_before,
        "no body was rewritten"
    );

    // A new process (nothing cached, old KEK gone) still reads everything written before.
    let app = app.restart(|_| {}).await;
    let read = app.get_json(&format!("Patient/{patient}"), 200).await;
    assert!(read.to_string().contains(CANARY));
    app.get_json(&format!("Organization/{organization}"), 200)
        .await;
    // And writes new data under the new KEK.
    app.create_id(&canary_patient(2)).await;
    let status = custodian(&app, &["keys", "status"]);
    assert!(status.contains("local:2: 3"), "{status}");
}
both_backends!(key_rotation, super::rotation_rewraps_without_losing_data);

/// The server with the aws key provider against the KMS emulator over HTTP: round trips, a KMS
/// that hangs (503 with Retry-After, nothing written), and recovery without a restart. With
/// AWS KMS configured the development issuer is refused, so tokens come from the real OpenID
/// provider, as in production.
async fn aws_provider_round_trips_and_fails_closed(backend: Backend) {
    const AUDIENCE: &str = "urn:custodian:test-kms";
    let Some(kms) = crate::moto::MotoServer::start().await else {
        return;
    };
    let Some(oidc) = crate::oidc::OidcProvider::start(&[AUDIENCE]).await else {
        return;
    };
    let key_id = kms.create_key().await;
    let endpoint = kms.endpoint_url();
    let issuer = oidc.issuer().to_string();
    let Some(mut app) = crate::helpers::spawn_app_with(backend, |settings| {
        settings.auth.dev_issuer = custodian::config::DevIssuerMode::Off;
        settings.auth.issuers = issuer;
        settings.auth.audience = Some(AUDIENCE.into());
        settings.keys.provider = custodian::config::KeyProviderKind::Aws;
        settings.keys.aws_key_id = Some(key_id);
        settings.keys.aws_endpoint_url = Some(endpoint);
        settings.keys.aws_region = Some("us-east-1".into());
        settings.keys.timeout_ms = 1000;
        // No cache: every request needs KMS, so the outage is visible on reads too.
        settings.keys.cache_max_entries = 0;
    })
    .await
    else {
        return;
    };
    app.use_token(&oidc.client_secret_token("system/*.cruds", AUDIENCE).await);

    let first = app.create_id(&canary_patient(1)).await;
    let read = app.get_json(&format!("Patient/{first}"), 200).await;
    assert!(read.to_string().contains(CANARY));
    let kek = app
        .strings("SELECT kek_id FROM data_keys")
        .await
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    // The patient's compartment key, and the tenant's key (from which the search index key is
    // derived): both wrapped by the KMS key.
    assert_eq!(kek.len(), 2);
    assert!(
        kek.iter().all(|kek| kek.starts_with("arn:aws:kms:")),
        "wrapped by the KMS key: {kek:?}"
    );
    let rows_before = app.count("SELECT COUNT(*) FROM resource_versions").await;

    kms.pause();
    let started = std::time::Instant::now();
    let during = app.create(&canary_patient(2)).await;
    assert_eq!(during.status(), 503);
    assert!(during.headers().contains_key("retry-after"));
    let outcome: Value = during.json().await.unwrap();
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(
        !outcome.to_string().contains("kms"),
        "no internals: {outcome}"
    );
    assert_eq!(app.get(&format!("Patient/{first}")).await.status(), 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        app.count("SELECT COUNT(*) FROM resource_versions").await,
        rows_before,
        "nothing half-written"
    );

    kms.resume();
    app.get_json(&format!("Patient/{first}"), 200).await;
    app.create_id(&canary_patient(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_provider_sqlite() {
    aws_provider_round_trips_and_fails_closed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_provider_postgres() {
    aws_provider_round_trips_and_fails_closed(Backend::Postgres).await;
}
