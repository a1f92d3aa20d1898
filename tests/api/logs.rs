//! The real binary's log never holds PHI or secrets: it runs with debug logging while a request
//! carries canary values (in the body, in an invalid body, in conditional criteria), the
//! database URL carries a canary password and the requests carry a bearer token; then its whole
//! output is searched for them. It also shows the startup warning about the PostgreSQL
//! server's settings.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::helpers::{repo_dir, FHIR_JSON};

const NAME_CANARY: &str = "Zqxcanaryname";
const MRN_CANARY: &str = "MRN-canary-7731";
const PASSWORD_CANARY: &str = "pw-canary-5521";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn logs_hold_no_phi_and_no_secrets() {
    let data_dir = std::env::temp_dir().join(format!("custodian-logs-{}", uuid::Uuid::new_v4()));
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_custodian"));
    command
        .arg("serve")
        .env("CUSTODIAN_LISTEN", format!("127.0.0.1:{port}"))
        .env("CUSTODIAN_DATA_DIR", &data_dir)
        .env("CUSTODIAN_PROFILES_DIR", repo_dir().join("fhir-profiles"))
        .env("CUSTODIAN_AUTH__POLICIES_DIR", repo_dir().join("policies"))
        .env("CUSTODIAN_AUDIT__CATALOG_DIR", repo_dir().join("audit"))
        .env("CUSTODIAN_AUTH__DEV_ISSUER", "on")
        .env("CUSTODIAN_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The PostgreSQL variant proves a password in the URL stays out of the log; without a
    // reachable server (and outside CI) SQLite still checks the PHI canaries.
    let postgres = std::env::var("CUSTODIAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let with_password = postgres.replacen("postgres@", &format!("postgres:{PASSWORD_CANARY}@"), 1);
    let database = format!("custodian_logs_{}", uuid::Uuid::new_v4().simple());
    let postgres_up = std::process::Command::new("psql")
        .arg(format!("{postgres}/postgres"))
        .args(["-Atc", &format!("CREATE DATABASE {database}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if postgres_up {
        command.env(
            "CUSTODIAN_DATABASE_URL",
            format!("{with_password}/{database}"),
        );
    }
    // The token comes from `custodian token`, as a developer would get one.
    let minted = Command::new(env!("CARGO_BIN_EXE_custodian"))
        .args(["token", "--role", "ehr-system"])
        .env("CUSTODIAN_LISTEN", format!("127.0.0.1:{port}"))
        .env("CUSTODIAN_DATA_DIR", &data_dir)
        .env("CUSTODIAN_AUTH__DEV_ISSUER", "on")
        .output()
        .expect("custodian token");
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let mut server = command.spawn().expect("start custodian");
    // Drain both pipes while the server runs: at trace level its background workers write more
    // than a pipe holds, and a full pipe would stop the server in the middle of a log line.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            text
        })
    };
    let stdout = drain(server.stdout.take().map(|pipe| Box::new(pipe) as _));
    let stderr = drain(server.stderr.take().map(|pipe| Box::new(pipe) as _));

    custodian::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..100 {
        if client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "server did not become ready");

    let patient = json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": MRN_CANARY}],
        "name": [{"family": NAME_CANARY}],
        "birthDate": "1970-01-01"
    });
    let created = client
        .post(format!("{base}/Patient"))
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", format!("identifier=urn:mrn|{MRN_CANARY}"))
        .body(patient.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let invalid = json!({"resourceType": "Patient", "name": [{"family": NAME_CANARY, "nick": MRN_CANARY}], "active": NAME_CANARY});
    let rejected = client
        .post(format!("{base}/Patient"))
        .header("content-type", FHIR_JSON)
        .body(invalid.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 400);
    let rejected_body = rejected.text().await.unwrap();
    assert!(
        !rejected_body.contains(NAME_CANARY),
        "400 echoes a value: {rejected_body}"
    );
    client
        .delete(format!("{base}/Patient?identifier=urn:mrn|{MRN_CANARY}"))
        .send()
        .await
        .unwrap();

    // SIGTERM: a graceful stop, then read everything it wrote.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string())
        .status();
    let (stdout, stderr) = tokio::task::spawn_blocking(move || {
        let _ = server.wait();
        (stdout.join().unwrap(), stderr.join().unwrap())
    })
    .await
    .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(
        log.contains("custodian listening"),
        "the log was captured: {log}"
    );
    assert!(
        log.contains("custodian stopped"),
        "the server stopped gracefully: {log}"
    );
    for canary in [NAME_CANARY, MRN_CANARY, PASSWORD_CANARY, token.as_str()] {
        assert!(
            !log.contains(canary),
            "the log contains the canary {canary}"
        );
    }
    // The startup check of the database server's settings names autovacuum when it is off
    // (the server the suite runs against may have it either way), and nothing when it is on.
    if postgres_up {
        let shown = Command::new("psql")
            .arg(format!("{postgres}/postgres"))
            .args(["-Atc", "SHOW autovacuum"])
            .output()
            .expect("psql");
        let autovacuum = String::from_utf8_lossy(&shown.stdout).trim().to_string();
        assert_eq!(
            log.contains("PostgreSQL has autovacuum = off"),
            autovacuum == "off",
            "autovacuum is {autovacuum}; the log: {log}"
        );
    }
}
