//! `Patient/$erase` from outside: the canary-bearing patient's rows, ciphertexts and data key
//! leave the database (raw SQLite files and a pg_dump scanned), every read path answers 404 or
//! nothing, the audit log still verifies and holds only the pseudonym, a legal hold refuses
//! with 409 and changes nothing, other roles get 403, a second node stops serving at once, and
//! a database copy taken before the erasure, opened by a fresh server after it, serves nothing.

use serde_json::{json, Value};

use custodian::authz::dev::DevTokenRequest;
use sqlx::Connection;

use crate::authz::caller;
use crate::both_backends;
use crate::encryption::{canary_patient, contains, custodian, database_bytes, encodings, CANARY};
use crate::helpers::{Backend, TestApp, FHIR_JSON};

fn compliance_officer() -> DevTokenRequest {
    caller("compliance-officer", "user/AuditEvent.rs user/Patient.d")
}

async fn erase_as(app: &TestApp, token: &str, patient: &str) -> (u16, Value) {
    let response = app
        .anonymous
        .post(app.url(&format!("Patient/{patient}/$erase")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A canary patient with an updated version (history), an Observation and a Condition.
/// Returns the patient's id and the ids of the other two.
async fn canary_record(app: &TestApp, index: usize) -> (String, Vec<String>) {
    let patient = app.create_id(&canary_patient(index)).await;
    let mut again = app.get_json(&format!("Patient/{patient}"), 200).await;
    again["active"] = json!(true);
    assert_eq!(
        app.put(&format!("Patient/{patient}"), &again)
            .await
            .status(),
        200
    );
    let observation = app
        .create_id(&json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}], "text": format!("{CANARY} finding")},
            "subject": {"reference": format!("Patient/{patient}")},
            "effectiveDateTime": "2024-05-06",
            "valueString": format!("{CANARY} value")}))
        .await;
    let condition = app
        .create_id(&json!({"resourceType": "Condition",
            "code": {"text": format!("{CANARY} diagnosis")},
            "subject": {"reference": format!("Patient/{patient}")}}))
        .await;
    (
        patient,
        vec![
            format!("Observation/{observation}"),
            format!("Condition/{condition}"),
        ],
    )
}

async fn pseudonym_of(app: &TestApp, patient: &str) -> String {
    app.strings(&format!(
        "SELECT pseudonym FROM patient_compartments WHERE patient_id = '{patient}'"
    ))
    .await
    .into_iter()
    .next()
    .flatten()
    .expect("the patient's compartment")
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
        .collect()
}

/// The stored bytes of a column for rows matching `condition`, read as hex.
async fn stored_bytes(app: &TestApp, table: &str, column: &str, condition: &str) -> Vec<Vec<u8>> {
    let hex = match app.backend {
        Backend::Sqlite => format!("hex({column})"),
        Backend::Postgres => format!("encode({column}, 'hex')"),
    };
    app.strings(&format!(
        "SELECT {hex} FROM {table} WHERE {condition} AND {column} IS NOT NULL"
    ))
    .await
    .into_iter()
    .flatten()
    .map(|text| unhex(&text))
    .collect()
}

async fn rows_of(app: &TestApp, pseudonym: &str) -> i64 {
    app.count(&format!(
        "SELECT (SELECT COUNT(*) FROM resource_versions WHERE compartment = '{pseudonym}') \
         + (SELECT COUNT(*) FROM data_keys WHERE compartment = '{pseudonym}') \
         + (SELECT COUNT(*) FROM patient_compartments WHERE pseudonym = '{pseudonym}')"
    ))
    .await
}

async fn erasure_shreds_the_record(app: TestApp) {
    let (patient, others) = canary_record(&app, 1).await;
    let (control, _) = canary_record(&app, 2).await;
    let pseudonym = pseudonym_of(&app, &patient).await;
    // What the erasure must remove: every ciphertext of the compartment, and its wrapped key.
    let condition = format!("compartment = '{pseudonym}'");
    let ciphertexts = stored_bytes(&app, "resource_versions", "body", &condition).await;
    assert_eq!(
        ciphertexts.len(),
        4,
        "two Patient versions, the Observation, the Condition"
    );
    let wrapped = stored_bytes(&app, "data_keys", "wrapped", &condition).await;
    assert_eq!(wrapped.len(), 1, "one data key per compartment");
    let before = database_bytes(&app);
    // pg_dump writes bytea as hex text; the SQLite files hold the bytes themselves.
    let probes: Vec<Vec<u8>> = ciphertexts
        .iter()
        .chain(wrapped.iter())
        .map(|bytes| {
            let tail = &bytes[bytes.len() - 24..];
            match app.backend {
                Backend::Sqlite => tail.to_vec(),
                Backend::Postgres => tail
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>()
                    .into_bytes(),
            }
        })
        .collect();
    for probe in &probes {
        assert!(
            contains(&before, probe),
            "the scan sees the ciphertexts before"
        );
    }
    // The record reads back, and the node has its key cached.
    assert_eq!(app.get(&format!("Patient/{patient}")).await.status(), 200);
    let index_rows = format!(
        "SELECT COUNT(*) FROM search_terms WHERE resource_id IN ('{patient}', '{}', '{}')",
        others[0].split('/').nth(1).unwrap(),
        others[1].split('/').nth(1).unwrap()
    );
    assert!(app.count(&index_rows).await > 0);

    let token = app.token(compliance_officer());
    let (status, receipt) = erase_as(&app, &token, &patient).await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(receipt["resourceType"], "Parameters");
    let parameter = |name: &str| {
        receipt["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|parameter| parameter["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {receipt}"))
    };
    assert_eq!(parameter("tombstone")["valueString"], pseudonym.as_str());
    assert_eq!(parameter("resourcesErased")["valueInteger"], 3);
    assert!(
        !receipt.to_string().contains(&patient),
        "the receipt names no patient id"
    );

    // Nothing of the compartment is left: rows, key, index, mapping; only the tombstone.
    assert_eq!(rows_of(&app, &pseudonym).await, 0);
    assert_eq!(app.count(&index_rows).await, 0);
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM resource_heads WHERE resource_id = '{patient}'"
        ))
        .await,
        0
    );
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM erasures WHERE pseudonym = '{pseudonym}' AND resources_erased = 3"
        ))
        .await,
        1
    );
    // The canary scan: not in clear, not even as ciphertext or wrapped key, in any table.
    let after = database_bytes(&app);
    for form in encodings(CANARY) {
        assert!(
            !contains(&after, &form),
            "{:?}",
            String::from_utf8_lossy(&form)
        );
    }
    for probe in &probes {
        assert!(
            !contains(&after, probe),
            "a ciphertext of the erased compartment is left"
        );
    }

    // Every read path: 404 or nothing.
    let erased_ids: Vec<String> = std::iter::once(patient.clone())
        .chain(
            others
                .iter()
                .map(|key| key.split('/').nth(1).unwrap().to_string()),
        )
        .collect();
    for path in [
        format!("Patient/{patient}"),
        format!("Patient/{patient}/_history"),
        format!("Patient/{patient}/_history/1"),
        format!("Patient/{patient}/$everything"),
        others[0].clone(),
        format!("{}/_history", others[0]),
        format!("{}/_history/1", others[1]),
    ] {
        assert_eq!(app.get(&path).await.status(), 404, "GET {path}");
    }
    let system_history = app.get_json("_history?_count=500", 200).await["entry"].to_string();
    assert!(
        erased_ids
            .iter()
            .all(|id| !system_history.contains(id.as_str())),
        "system history still lists the erased record: {system_history}"
    );
    for search in [
        format!("Observation?subject=Patient/{patient}"),
        format!("Patient?_id={patient}"),
        "Condition?_count=100".to_string(),
        "Observation?code=http://loinc.org|8480-6".to_string(),
    ] {
        let bundle = app.get_json(&search, 200).await;
        // The entries (the self link repeats the query).
        let text = bundle["entry"].to_string();
        assert!(
            erased_ids.iter().all(|id| !text.contains(id.as_str())),
            "{search} still finds the erased record: {text}"
        );
    }
    // Another patient is untouched.
    assert_eq!(app.get(&format!("Patient/{control}")).await.status(), 200);
    let control_everything = app
        .get_json(&format!("Patient/{control}/$everything"), 200)
        .await;
    assert_eq!(control_everything["total"], 3);
    // Erasing again: the patient is unknown now.
    assert_eq!(erase_as(&app, &token, &patient).await.0, 404);

    // The audit log: complete, verifiable, and it names the erasure by pseudonym only.
    let erase_records = app
        .strings(&format!(
            "SELECT resource_id FROM audit_records WHERE interaction = 'erase' AND outcome = 200 \
             AND patient = '{pseudonym}'"
        ))
        .await;
    assert_eq!(
        erase_records,
        vec![None],
        "one erase record, without the patient's id"
    );
    let records = match app.backend {
        Backend::Sqlite => {
            "SELECT CAST(record AS TEXT) FROM audit_records WHERE interaction = 'erase'"
        }
        Backend::Postgres => {
            "SELECT convert_from(record, 'UTF8') FROM audit_records WHERE interaction = 'erase'"
        }
    };
    for record in app.strings(records).await.into_iter().flatten() {
        assert!(!record.contains(&patient), "{record}");
    }
    let output = custodian(&app, &["audit", "verify"]);
    assert!(output.contains("audit log verified"), "{output}");
    // The ledger outside the database names the compartment, and nothing else of the patient.
    let ledger = std::fs::read_to_string(app.data_dir().join("erasure-ledger.jsonl")).unwrap();
    assert!(ledger.contains(&pseudonym), "{ledger}");
    assert!(
        !ledger.contains(&patient) && !ledger.contains(CANARY),
        "{ledger}"
    );
}
both_backends!(erase_shreds, super::erasure_shreds_the_record);

async fn a_legal_hold_refuses_and_other_roles_are_forbidden(app: TestApp) {
    let (patient, others) = canary_record(&app, 3).await;
    let pseudonym = pseudonym_of(&app, &patient).await;
    let rows = rows_of(&app, &pseudonym).await;
    let compliance = app.token(compliance_officer());

    // Roles the policy does not name for erase, and a scope without Patient.d: 403.
    let forbidden = [
        app.token(crate::helpers::ehr_system()),
        app.token(caller("admin", "user/*.cruds system/*.cruds")),
        app.token(DevTokenRequest {
            fhir_user: Some("Practitioner/doc".into()),
            ..caller("practitioner", "user/*.cruds")
        }),
        app.token(DevTokenRequest {
            patient: Some(patient.clone()),
            fhir_user: Some(format!("Patient/{patient}")),
            ..caller("patient", "launch/patient patient/*.cruds")
        }),
        app.token(caller("compliance-officer", "user/AuditEvent.rs")),
    ];
    for token in &forbidden {
        let (status, outcome) = erase_as(&app, token, &patient).await;
        assert_eq!(status, 403, "{outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }

    // A legal hold: 409 with the case, nothing erased.
    let placed = custodian(
        &app,
        &[
            "erasure",
            "hold",
            "--patient",
            &patient,
            "--case",
            "CASE-2026-17",
        ],
    );
    assert!(placed.contains(&pseudonym), "{placed}");
    assert!(custodian(&app, &["erasure", "holds"]).contains("CASE-2026-17"));
    let (status, outcome) = erase_as(&app, &compliance, &patient).await;
    assert_eq!(status, 409, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "conflict");
    assert!(outcome.to_string().contains("CASE-2026-17"), "{outcome}");
    assert_eq!(rows_of(&app, &pseudonym).await, rows, "nothing was deleted");
    assert_eq!(app.get(&format!("Patient/{patient}")).await.status(), 200);
    assert_eq!(app.get(&others[0]).await.status(), 200);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM erasures").await,
        0,
        "no tombstone for a refused erasure"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'erase' AND outcome = 409 \
             AND patient = '{pseudonym}' AND resource_id IS NULL"
        ))
        .await,
        1,
        "the refusal is audited, by pseudonym"
    );

    // Released: the erasure goes through.
    custodian(&app, &["erasure", "release", "--patient", &patient]);
    let (status, receipt) = erase_as(&app, &compliance, &patient).await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(rows_of(&app, &pseudonym).await, 0);
    assert_eq!(app.get(&format!("Patient/{patient}")).await.status(), 404);
}
both_backends!(
    holds_and_roles,
    super::a_legal_hold_refuses_and_other_roles_are_forbidden
);

async fn another_node_stops_serving_at_once(app: TestApp) {
    let (patient, others) = canary_record(&app, 4).await;
    let other_node = app.second_node().await;
    // The other node reads the record: its data key is now in that node's cache.
    assert_eq!(
        other_node.get(&format!("Patient/{patient}")).await.status(),
        200
    );
    assert_eq!(
        other_node
            .get_json(&format!("Patient/{patient}/$everything"), 200)
            .await["total"],
        3
    );
    let token = app.token(compliance_officer());
    assert_eq!(erase_as(&app, &token, &patient).await.0, 200);
    // Immediately, without waiting for any cache to expire.
    assert_eq!(
        other_node.get(&format!("Patient/{patient}")).await.status(),
        404
    );
    assert_eq!(other_node.get(&others[0]).await.status(), 404);
    assert_eq!(
        other_node
            .get(&format!("Patient/{patient}/$everything"))
            .await
            .status(),
        404
    );
    let search = other_node
        .get_json(&format!("Observation?subject=Patient/{patient}"), 200)
        .await;
    assert_eq!(
        search["entry"].as_array().map(Vec::len).unwrap_or_default(),
        0,
        "{search}"
    );
    // A write into the erased compartment on the other node does not revive it: the patient is
    // gone, so the new Observation lands in a fresh compartment with a fresh key.
    let late = other_node
        .client
        .post(other_node.url("Observation"))
        .header("content-type", FHIR_JSON)
        .body(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "late"},
                "subject": {"reference": format!("Patient/{patient}")}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 201);
    let pseudonyms = app
        .count("SELECT COUNT(*) FROM erasures e JOIN data_keys k ON k.compartment = e.pseudonym")
        .await;
    assert_eq!(
        pseudonyms, 0,
        "no key of an erased compartment exists again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sqlite() {
    let app = crate::helpers::spawn_app(Backend::Sqlite).await.unwrap();
    another_node_stops_serving_at_once(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_postgres() {
    if let Some(app) = crate::helpers::spawn_app(Backend::Postgres).await {
        another_node_stops_serving_at_once(app).await;
    }
}

/// A copy of the database as it is now: the SQLite file (`VACUUM INTO`, a consistent copy of
/// a live database), or a new PostgreSQL database restored from a `pg_dump`.
async fn backup(app: &TestApp) -> String {
    match app.backend {
        Backend::Sqlite => {
            let path = app
                .data_dir()
                .join(format!("backup-{}.db", uuid::Uuid::new_v4()));
            app.execute(&format!("VACUUM INTO '{}'", path.display()))
                .await;
            format!("sqlite://{}?mode=rwc", path.display())
        }
        Backend::Postgres => {
            let (server, _) = app.database_url.rsplit_once('/').unwrap();
            let name = format!("custodian_test_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
                .await
                .unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            let copy = format!("{server}/{name}");
            let dump = std::process::Command::new("pg_dump")
                .arg(&app.database_url)
                .output()
                .expect("pg_dump");
            assert!(dump.status.success());
            let mut restore = std::process::Command::new("psql")
                .args(["-q", "-v", "ON_ERROR_STOP=1", &copy])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("psql");
            use std::io::Write;
            restore
                .stdin
                .take()
                .unwrap()
                .write_all(&dump.stdout)
                .unwrap();
            assert!(restore.wait().unwrap().success(), "restore the dump");
            copy
        }
    }
}

async fn count_in(database_url: &str, sql: &str) -> i64 {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let mut connection = sqlx::AnyConnection::connect(database_url).await.unwrap();
    sqlx::query(sql)
        .fetch_one(&mut connection)
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn a_restored_older_backup_does_not_bring_the_patient_back(app: TestApp) {
    let (patient, others) = canary_record(&app, 5).await;
    let (control, _) = canary_record(&app, 6).await;
    let pseudonym = pseudonym_of(&app, &patient).await;
    let copy = backup(&app).await;
    let held = format!(
        "SELECT (SELECT COUNT(*) FROM resource_versions WHERE compartment = '{pseudonym}') \
         + (SELECT COUNT(*) FROM data_keys WHERE compartment = '{pseudonym}')"
    );
    assert_eq!(
        count_in(&copy, &held).await,
        5,
        "the copy holds the patient and their key"
    );

    let token = app.token(compliance_officer());
    assert_eq!(erase_as(&app, &token, &patient).await.0, 200);

    // A fresh server process on the old copy, with this node's data directory (keys, ledger).
    let restored = app.node_on(&copy).await;
    assert_eq!(
        count_in(&copy, &held).await,
        0,
        "erased again before serving"
    );
    assert_eq!(
        count_in(
            &copy,
            &format!("SELECT COUNT(*) FROM erasures WHERE pseudonym = '{pseudonym}'")
        )
        .await,
        1
    );
    assert_eq!(
        count_in(
            &copy,
            &format!("SELECT COUNT(*) FROM patient_compartments WHERE patient_id = '{patient}'")
        )
        .await,
        0
    );
    for path in [
        format!("Patient/{patient}"),
        format!("Patient/{patient}/_history/1"),
        format!("Patient/{patient}/$everything"),
        others[0].clone(),
        others[1].clone(),
    ] {
        assert_eq!(restored.get(&path).await.status(), 404, "GET {path}");
    }
    let search = restored
        .get_json(&format!("Observation?subject=Patient/{patient}"), 200)
        .await;
    assert_eq!(
        search["entry"].as_array().map(Vec::len).unwrap_or_default(),
        0,
        "{search}"
    );
    // The rest of the copy is served as it was.
    assert_eq!(
        restored.get(&format!("Patient/{control}")).await.status(),
        200
    );
    // The re-application is audited, by pseudonym.
    assert_eq!(
        count_in(
            &copy,
            &format!(
                "SELECT COUNT(*) FROM audit_records WHERE interaction = 'erase' \
                 AND patient = '{pseudonym}' AND resource_id IS NULL"
            )
        )
        .await,
        1
    );
}
both_backends!(
    restored_backup,
    super::a_restored_older_backup_does_not_bring_the_patient_back
);

/// On PostgreSQL the server runs as a login role in `custodian_app` (README, Audit): the
/// migrations must grant it what erasure and the ledger's re-application need, and no more on
/// the tombstones than reading and adding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_as_the_application_role_postgres() {
    let Some(app) = crate::helpers::spawn_app(Backend::Postgres).await else {
        return;
    };
    let (patient, others) = canary_record(&app, 7).await;
    let pseudonym = pseudonym_of(&app, &patient).await;
    let role = format!("custodian_erase_{}", uuid::Uuid::new_v4().simple());
    app.execute(&format!("CREATE ROLE {role} LOGIN IN ROLE custodian_app"))
        .await;
    let (server, database) = app.database_url.rsplit_once('/').unwrap();
    let as_role = format!(
        "{}{role}@{}/{database}",
        &server[..server.find("//").unwrap() + 2],
        &server[server.find('@').unwrap() + 1..]
    );
    let node = app
        .node_with(&as_role, |settings| settings.migrate_on_start = false)
        .await;
    // The node shares the first node's data directory, where the development issuer's key is.
    let token = crate::helpers::dev_token(app.data_dir(), &node.base_url, compliance_officer());
    let (status, receipt) = erase_as(&node, &token, &patient).await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(rows_of(&app, &pseudonym).await, 0);
    assert_eq!(node.get(&others[0]).await.status(), 404);
    // Tombstones: read and added, never changed or removed by the application.
    for statement in [
        format!("UPDATE erasures SET resources_erased = 0 WHERE pseudonym = '{pseudonym}'"),
        format!("DELETE FROM erasures WHERE pseudonym = '{pseudonym}'"),
    ] {
        let script = format!("SET ROLE {role}; {statement}");
        assert!(app.try_execute(&script).await.is_err(), "{statement}");
    }
    drop(node);
    // Best effort: the node's connections may still be closing.
    let _ = app
        .try_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}
