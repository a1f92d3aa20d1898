//! The audit log through the real server and the real `custodian audit` command: one record per
//! request with the right agent and outcome, append-only tables, tampering found and named,
//! fail-closed appends, several nodes on one database, proofs, and the compliance endpoints.

use std::process::Command;

use custodian::audit::merkle;
use custodian::authz::dev::DevTokenRequest;
use custodian::store::AUDIT_IDLE_CHECK;
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{
    read_audit_journal_path, repo_dir, spawn_app, spawn_app_with, Backend, TestApp, FHIR_JSON,
};

fn compliance_officer() -> DevTokenRequest {
    DevTokenRequest {
        subject: "auditor-1".into(),
        roles: vec!["compliance-officer".into()],
        scope: "user/AuditEvent.rs user/Consent.rs".into(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    }
}

/// The newest audit row as `interaction:outcome:agent:resource_type`.
async fn last_record(app: &TestApp) -> String {
    app.strings(
        "SELECT interaction || ':' || CAST(outcome AS TEXT) || ':' || COALESCE(agent, '-') || ':' || COALESCE(resource_type, '-') \
         FROM audit_records ORDER BY record_id DESC LIMIT 1",
    )
    .await
    .remove(0)
    .unwrap()
}

async fn records(app: &TestApp) -> i64 {
    app.count("SELECT COUNT(*) FROM audit_records").await
}

/// Asserts that exactly one record was added since `before`, and what it says.
async fn one_more(app: &TestApp, before: &mut i64, label: &str, want: &str) {
    *before += 1;
    assert_eq!(records(app).await, *before, "{label}: exactly one record");
    assert_eq!(last_record(app).await, want, "{label}");
}

async fn every_request_leaves_exactly_one_record(app: TestApp) {
    let mut count = records(&app).await;
    let id = app
        .create_id(&json!({"resourceType": "Patient", "active": true}))
        .await;
    one_more(&app, &mut count, "create", "create:201:test-ehr:Patient").await;
    let mut body = app.get_json(&format!("Patient/{id}"), 200).await;
    one_more(&app, &mut count, "read", "read:200:test-ehr:Patient").await;
    app.get_json("Patient/nobody", 404).await;
    one_more(&app, &mut count, "missing", "read:404:test-ehr:Patient").await;
    body["active"] = json!(false);
    assert_eq!(app.put(&format!("Patient/{id}"), &body).await.status(), 200);
    one_more(&app, &mut count, "update", "update:200:test-ehr:Patient").await;
    app.get_json(&format!("Patient/{id}/_history/1"), 200).await;
    one_more(&app, &mut count, "vread", "vread:200:test-ehr:Patient").await;
    app.get_json(&format!("Patient/{id}/_history"), 200).await;
    one_more(
        &app,
        &mut count,
        "history",
        "history-instance:200:test-ehr:Patient",
    )
    .await;
    assert_eq!(app.delete(&format!("Patient/{id}")).await.status(), 204);
    one_more(&app, &mut count, "delete", "delete:204:test-ehr:Patient").await;
    // Refused requests are recorded too: no token, and a forbidden interaction.
    assert_eq!(
        app.anonymous
            .get(app.url("Patient/x"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    one_more(&app, &mut count, "unauthenticated", "login:401:-:Patient").await;
    let read_only = app.token(DevTokenRequest {
        subject: "reader".into(),
        roles: vec!["ehr-system".into()],
        scope: "system/*.rs".into(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    let denied = app
        .anonymous
        .post(app.url("Patient"))
        .bearer_auth(&read_only)
        .header("content-type", FHIR_JSON)
        .body(json!({"resourceType": "Patient"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    one_more(&app, &mut count, "forbidden", "create:403:reader:Patient").await;
    // Writes commit their record with the data: the row's patient pseudonym is the resource's.
    let pseudonyms = app
        .strings(&format!(
            "SELECT DISTINCT patient FROM audit_records WHERE resource_id = '{id}' AND patient IS NOT NULL"
        ))
        .await;
    let compartment = app
        .strings(&format!(
            "SELECT DISTINCT compartment FROM resource_versions WHERE resource_id = '{id}'"
        ))
        .await;
    assert_eq!(pseudonyms, compartment);
}
both_backends!(
    one_record_per_request,
    super::every_request_leaves_exactly_one_record
);

async fn the_log_is_append_only(app: TestApp) {
    app.create_id(&json!({"resourceType": "Organization", "name": "x"}))
        .await;
    // Wait until the sequencer placed the record, so that the log has a row to protect.
    for _ in 0..50 {
        if app.count("SELECT COUNT(*) FROM audit_log").await >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for statement in [
        "UPDATE audit_records SET outcome = 999",
        "DELETE FROM audit_records",
        "UPDATE audit_log SET sequence = sequence + 1000",
        "DELETE FROM audit_log",
        "UPDATE audit_counter SET next_sequence = 0 WHERE id = 2",
    ] {
        let result = app.try_execute(statement).await;
        if statement.contains("audit_counter") {
            continue; // the counter must move; it is not part of the log
        }
        assert!(result.is_err(), "{statement} must be refused");
    }
    if app.backend == Backend::Postgres {
        assert!(app.try_execute("TRUNCATE audit_log").await.is_err());
        assert!(app
            .try_execute("TRUNCATE audit_records CASCADE")
            .await
            .is_err());
        // The application role has no UPDATE/DELETE on the audit tables.
        let grants = app
            .count(
                "SELECT COUNT(*) FROM information_schema.role_table_grants WHERE grantee = 'custodian_app' \
                 AND table_name IN ('audit_records', 'audit_log', 'audit_checkpoints') AND privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')",
            )
            .await;
        assert_eq!(grants, 0);
    }
    assert!(records(&app).await >= 1);
}
both_backends!(append_only, super::the_log_is_append_only);

fn audit_cli(app: &TestApp, arguments: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_custodian"))
        .arg("audit")
        .args(arguments)
        .env("CUSTODIAN_DATA_DIR", app.data_dir())
        .env("CUSTODIAN_DATABASE_URL", &app.database_url)
        .env("CUSTODIAN_LOG", "warn")
        .output()
        .expect("run custodian audit");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A server that checkpoints every 4 records, with some traffic and at least two checkpoints.
async fn audited_app(backend: Backend) -> Option<TestApp> {
    let app = spawn_app_with(backend, |settings| {
        settings.audit.checkpoint_every_records = 4;
        settings.audit.checkpoint_every_secs = 1;
    })
    .await?;
    // Two rounds of five, each followed by its checkpoint.
    for round in 1..=2 {
        for index in 0..5 {
            app.create_id(
                &json!({"resourceType": "Organization", "name": format!("Org {round}-{index}")}),
            )
            .await;
        }
        for _ in 0..50 {
            if app.count("SELECT COUNT(*) FROM audit_checkpoints").await >= round {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(app.count("SELECT COUNT(*) FROM audit_checkpoints").await >= round);
    }
    let (ok, text) = audit_cli(&app, &["verify"]);
    assert!(ok, "an untouched log verifies: {text}");
    Some(app)
}

/// SQL that bypasses the append-only triggers, as a database superuser could.
fn bypassing_triggers(backend: Backend, statements: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "DROP TRIGGER audit_records_no_update; DROP TRIGGER audit_log_no_update; \
             DROP TRIGGER audit_log_no_delete; DROP TRIGGER audit_checkpoints_no_update; {statements}"
        ),
        Backend::Postgres => format!("SET session_replication_role = replica; {statements}"),
    }
}

fn replace_in_record(backend: Backend, sequence: i64, from: &str, to: &str) -> String {
    match backend {
        Backend::Sqlite => format!(
            "UPDATE audit_records SET record = CAST(replace(CAST(record AS TEXT), '{from}', '{to}') AS BLOB) \
             WHERE record_id = (SELECT record_id FROM audit_log WHERE sequence = {sequence});"
        ),
        Backend::Postgres => format!(
            "UPDATE audit_records SET record = convert_to(replace(convert_from(record, 'UTF8'), '{from}', '{to}'), 'UTF8') \
             WHERE record_id = (SELECT record_id FROM audit_log WHERE sequence = {sequence});"
        ),
    }
}

/// Deletes the row in audit_records of the record placed at `sequence`, leaving its audit_log
/// entry (on SQLite with the foreign key's enforcement turned off, as a superuser could).
fn delete_record_row(backend: Backend, sequence: i64) -> String {
    let delete = format!(
        "DELETE FROM audit_records WHERE record_id = (SELECT record_id FROM audit_log WHERE sequence = {sequence});"
    );
    match backend {
        Backend::Sqlite => {
            format!("DROP TRIGGER audit_records_no_delete; PRAGMA foreign_keys = OFF; {delete}")
        }
        Backend::Postgres => delete,
    }
}

async fn tampering_is_found_and_named(backend: Backend) {
    let cases: Vec<(&str, String, &str)> = vec![
        ("a changed field", replace_in_record(backend, 3, "\"outcome\":201", "\"outcome\":200"), "record 3 was altered"),
        ("a deleted record", "DELETE FROM audit_log WHERE sequence = 2;".into(), "record 2 is missing"),
        (
            "two swapped records",
            "UPDATE audit_log SET sequence = -1 WHERE sequence = 1; UPDATE audit_log SET sequence = 1 WHERE sequence = 2; \
             UPDATE audit_log SET sequence = 2 WHERE sequence = -1;"
                .into(),
            "record 1 was altered",
        ),
        ("a removed tail", "DELETE FROM audit_log WHERE sequence >= 6;".into(), "missing"),
        // The record's own row deleted, its place in the log left behind (on PostgreSQL no
        // foreign key joins the two since migration 0011): verify must name the hole.
        ("a record deleted under its place", delete_record_row(backend, 4), "record 4 is missing"),
        (
            "a forged checkpoint signature",
            "UPDATE audit_checkpoints SET signature = leaf_hash_placeholder;".into(),
            "invalid signature",
        ),
    ];
    for (case, tamper, named) in cases {
        let Some(app) = audited_app(backend).await else {
            return;
        };
        let tamper = tamper.replace(
            "leaf_hash_placeholder",
            "(SELECT record FROM audit_records ORDER BY record_id LIMIT 1)",
        );
        app.execute_script(&bypassing_triggers(backend, &tamper))
            .await;
        let (ok, text) = audit_cli(&app, &["verify"]);
        assert!(!ok, "{case}: verify must fail");
        assert!(text.contains(named), "{case}: expected {named:?} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_sqlite() {
    tampering_is_found_and_named(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_postgres() {
    tampering_is_found_and_named(Backend::Postgres).await;
}

async fn a_failing_audit_fails_the_request(app: TestApp) {
    let id = app
        .create_id(&json!({"resourceType": "Patient", "name": [{"family": "Hidden"}]}))
        .await;
    let versions = app.count("SELECT COUNT(*) FROM resource_versions").await;
    let sabotage = match app.backend {
        Backend::Sqlite => "CREATE TRIGGER audit_sabotage BEFORE INSERT ON audit_records BEGIN SELECT RAISE(ABORT, 'no audit'); END;",
        Backend::Postgres => "CREATE FUNCTION audit_sabotage() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no audit'; END; $$; \
             CREATE TRIGGER audit_sabotage BEFORE INSERT ON audit_records FOR EACH ROW EXECUTE FUNCTION audit_sabotage();",
    };
    app.execute_script(sabotage).await;
    if let Some(journal) = read_audit_journal_path(&app.database_url) {
        // On SQLite a read's record goes to the read-audit journal: it fails there.
        app.execute_script(&format!(
            "ATTACH DATABASE '{}' AS journal; \
             CREATE TRIGGER journal.journal_sabotage BEFORE INSERT ON audit_journal \
             BEGIN SELECT RAISE(ABORT, 'no audit'); END;",
            journal.display()
        ))
        .await;
    }
    let read = app.get(&format!("Patient/{id}")).await;
    assert_eq!(read.status(), 503);
    assert!(
        !read.text().await.unwrap().contains("Hidden"),
        "no data without its audit record"
    );
    let write = app
        .create(&json!({"resourceType": "Patient", "active": true}))
        .await;
    assert_eq!(write.status(), 503);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM resource_versions").await,
        versions,
        "a write whose audit record fails is not written"
    );
}
both_backends!(fail_closed, super::a_failing_audit_fails_the_request);

/// A server on SQLite (where reads' records go through the read-audit journal) and the id of a
/// Patient it holds.
async fn sqlite_app_with_a_patient() -> (TestApp, String) {
    let app = spawn_app(Backend::Sqlite)
        .await
        .expect("SQLite always runs");
    let id = app
        .create_id(&json!({"resourceType": "Patient", "active": true}))
        .await;
    (app, id)
}

/// On SQLite a read's record commits first to the read-audit journal beside the database, and
/// the sequencer copies it into the log. A record the journal still holds when the server
/// stops (a crash right after the read was answered) is copied by the next process, exactly
/// once, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_record_is_copied_once_by_the_next_process() {
    let (app, id) = sqlite_app_with_a_patient().await;
    app.get_json(&format!("Patient/{id}"), 200).await;
    let reads = "SELECT COUNT(*) FROM audit_records WHERE interaction = 'read'";
    assert_eq!(
        app.count(reads).await,
        1,
        "the read's record reached the log"
    );
    let journal = read_audit_journal_path(&app.database_url).expect("a SQLite journal");
    let database_url = app.database_url.clone();
    let app = app
        .restart(|_| {
            // Between the two processes: a read's record left in the journal, uncopied, with
            // an id far above those the first process used (as after years of records copied
            // and deleted): the next process must not step through the ids it never saw.
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let mut main =
                        <sqlx::AnyConnection as sqlx::Connection>::connect(&database_url)
                            .await
                            .expect("database");
                    sqlx::raw_sql(&format!(
                        "ATTACH DATABASE '{}' AS journal; \
                         UPDATE journal.sqlite_sequence SET seq = 50000000 \
                           WHERE name = 'audit_journal'; \
                         UPDATE audit_journal_progress SET copied_through = 50000000; \
                         INSERT INTO journal.audit_journal (tenant, recorded_us, interaction, \
                           resource_type, resource_id, outcome, agent, patient, record) \
                         SELECT tenant, recorded_us, interaction, resource_type, resource_id, \
                                outcome, agent, patient, record \
                         FROM audit_records WHERE interaction = 'read';",
                        journal.display()
                    ))
                    .execute(&mut main)
                    .await
                    .expect("leave a record in the journal");
                })
            })
        })
        .await;
    assert!(
        eventually_counts(&app, reads, 2).await,
        "the next process copies the journal's record"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.count(reads).await, 2, "copied once, not again");
    let (ok, text) = audit_cli(&app, &["verify"]);
    assert!(ok, "the log verifies: {text}");
    assert!(
        text.contains("3 records"),
        "create, read, copied read: {text}"
    );
}

/// The group-commit writer deletes copied records from the read-audit journal (a thousand at a
/// time, in its own transaction): after 1,200 reads the journal keeps fewer than a thousand
/// rows, and the log holds each read exactly once and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_journal_records_are_deleted_and_kept_once() {
    let (app, id) = sqlite_app_with_a_patient().await;
    let path = format!("Patient/{id}");
    let reads = 1_200;
    for _ in 0..reads / 50 {
        let batch = (0..50).map(|_| app.get(&path));
        for response in futures_util::future::join_all(batch).await {
            assert_eq!(response.status(), 200);
        }
        // Let each batch be copied, so that the writer sees copied rows to delete.
        app.count("SELECT 1").await;
    }
    let read_records = "SELECT COUNT(*) FROM audit_records WHERE interaction = 'read'";
    assert_eq!(
        app.count(read_records).await,
        reads,
        "each read once in the log"
    );
    let journal = read_audit_journal_path(&app.database_url).expect("a SQLite journal");
    let mut connection = <sqlx::AnyConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}?mode=ro",
        journal.display()
    ))
    .await
    .expect("journal");
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_journal")
        .fetch_one(&mut connection)
        .await
        .expect("count");
    assert!(kept < 1_000, "copied rows are deleted: {kept} kept");
    let (ok, text) = audit_cli(&app, &["verify"]);
    assert!(ok, "the log verifies: {text}");
}

/// On SQLite the sequencer copies reads' records from their journal once a second, at its
/// sweep (a pass with a look back), a second's reads in one batch; its other ticks place only
/// the records committed to the log's own table (writes', with their data). Driven through the
/// store, with no server and so no sequencer of its own running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_records_are_copied_at_the_sweep_and_writes_records_at_every_tick() {
    use custodian::store::{AuditEntry, HeldConnection, SqlStore, Store};
    let data_dir = std::env::temp_dir().join(format!("custodian-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).expect("temp dir");
    let url = format!("sqlite://{}/custodian.db?mode=rwc", data_dir.display());
    let store = SqlStore::connect(&url.into(), 4, None)
        .await
        .expect("SQLite");
    store.migrate().await.expect("migrations");
    let entry = |interaction: &str| AuditEntry {
        tenant: "default".into(),
        recorded_us: 1,
        interaction: interaction.into(),
        resource_type: Some("Patient".into()),
        resource_id: Some("p1".into()),
        outcome: 200,
        agent: Some("tester".into()),
        patient: None,
        record: format!("{{\"interaction\":\"{interaction}\"}}").into_bytes(),
    };
    // A read's record goes to the journal (the group-commit writer's path), a write's to the
    // log's table (as a write's own transaction does).
    let mut held = HeldConnection::default();
    store
        .append_audit_held(&mut held, &[entry("read")])
        .await
        .expect("journal append");
    store
        .append_audit(&[entry("create")])
        .await
        .expect("log append");
    assert_eq!(
        store.sequence_pending(100, 0).await.expect("tick"),
        1,
        "a tick places the write's record"
    );
    assert_eq!(
        store.audit_size().await.expect("size"),
        1,
        "and leaves the read's in the journal"
    );
    assert_eq!(
        store.sequence_pending(100, 0).await.expect("tick"),
        0,
        "another tick copies nothing"
    );
    assert_eq!(
        store.sequence_pending(100, 10_000).await.expect("sweep"),
        1,
        "the sweep copies the read's record and places it"
    );
    assert_eq!(store.audit_size().await.expect("size"), 2);
    assert_eq!(
        store.sequence_pending(100, 10_000).await.expect("sweep"),
        0,
        "each record once"
    );
    store.close().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The sequencer's idle tick, ten times a second on every node, probes the two tables' highest
/// ids and never reads either in full, however long the log grows (it once read every placed
/// record per tick on PostgreSQL: a tenth of a core at 150,000 records).
async fn the_idle_tick_reads_no_table_in_full(app: TestApp) {
    for name in ["One", "Two", "Three"] {
        app.create_id(&json!({"resourceType": "Organization", "name": name}))
            .await;
    }
    let plan = app.plan_of(AUDIT_IDLE_CHECK).await;
    assert!(!plan.is_empty(), "a plan");
    let full_scan = |line: &String| match app.backend {
        Backend::Postgres => line.contains("Seq Scan"),
        Backend::Sqlite => line.trim_start().starts_with("SCAN audit"),
    };
    assert!(!plan.iter().any(full_scan), "{plan:#?}");
}
both_backends!(idle_tick, super::the_idle_tick_reads_no_table_in_full);

/// Waits up to five seconds for `sql` to count at least `want`.
async fn eventually_counts(app: &TestApp, sql: &str, want: i64) -> bool {
    for _ in 0..50 {
        if app.count(sql).await >= want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// A record whose transaction commits after records with higher ids were placed in the log
/// (a slow request on PostgreSQL) still gets its place: the sequencer's periodic look back
/// below the highest placed id finds it. Simulated by inserting records with chosen ids: one
/// above everything, placed at once, then one just below it.
async fn a_late_commit_is_placed_in_the_log(app: TestApp) {
    app.create_id(&json!({"resourceType": "Organization", "name": "Early"}))
        .await;
    let highest = app.count("SELECT MAX(record_id) FROM audit_records").await;
    let copy_with_id = |record_id: i64| {
        let overriding = match app.backend {
            Backend::Sqlite => "",
            Backend::Postgres => "OVERRIDING SYSTEM VALUE",
        };
        format!(
            "INSERT INTO audit_records (record_id, tenant, recorded_us, interaction, resource_type, \
             resource_id, outcome, agent, patient, record) {overriding} \
             SELECT {record_id}, tenant, recorded_us, interaction, resource_type, resource_id, \
             outcome, agent, patient, record FROM audit_records WHERE record_id = {highest};"
        )
    };
    let placed =
        |record_id: i64| format!("SELECT COUNT(*) FROM audit_log WHERE record_id = {record_id}");
    app.execute_script(&copy_with_id(highest + 2)).await;
    assert!(
        eventually_counts(&app, &placed(highest + 2), 1).await,
        "a new record is placed within ~100 ms"
    );
    app.execute_script(&copy_with_id(highest + 1)).await;
    assert!(
        eventually_counts(&app, &placed(highest + 1), 1).await,
        "a record below the highest placed id is found by the look back"
    );
    if app.backend == Backend::Postgres {
        // Ids were chosen by hand; the identity must not hand them out again.
        app.execute_script(&format!(
            "SELECT setval(pg_get_serial_sequence('audit_records', 'record_id'), {});",
            highest + 2
        ))
        .await;
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM audit_log").await,
        records(&app).await,
        "every record placed once"
    );
    let (ok, text) = audit_cli(&app, &["verify"]);
    assert!(ok, "{text}");
}
both_backends!(late_commit, super::a_late_commit_is_placed_in_the_log);

async fn two_nodes_one_log(backend: Backend) {
    let Some(first) = spawn_app_with(backend, |settings| {
        settings.audit.checkpoint_every_records = 10;
    })
    .await
    else {
        return;
    };
    let second = first.second_node().await;
    let mut tasks = Vec::new();
    for node in [&first, &second] {
        for index in 0..8 {
            let client = node.client.clone();
            let url = node.url("Organization");
            tasks.push(tokio::spawn(async move {
                let created = client
                    .post(&url)
                    .header("content-type", FHIR_JSON)
                    .body(
                        json!({"resourceType": "Organization", "name": format!("N{index}")})
                            .to_string(),
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(created.status(), 201);
                let location = created.headers()["location"].to_str().unwrap().to_string();
                let read = client.get(location).send().await.unwrap();
                assert_eq!(read.status(), 200);
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        records(&first).await,
        32,
        "every request of both nodes, once"
    );
    let (ok, text) = audit_cli(&first, &["verify"]);
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_postgres() {
    two_nodes_one_log(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sqlite() {
    two_nodes_one_log(Backend::Sqlite).await;
}

async fn proofs_and_compliance_endpoints(backend: Backend) {
    let Some(app) = audited_app(backend).await else {
        return;
    };
    let auditor = app.token(compliance_officer());
    let get = async |path: &str, token: &str| {
        let response = app
            .anonymous
            .get(app.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    // Inclusion of record 2 in the tree of the first checkpoint, against the signed root.
    let size = app
        .count("SELECT MIN(tree_size) FROM audit_checkpoints")
        .await;
    let (status, proof) = get(&format!("_audit/proof?sequence=2&size={size}"), &auditor).await;
    assert_eq!(status, 200, "{proof}");
    let leaf = merkle::from_hex(proof["leaf_hash"].as_str().unwrap()).unwrap();
    let path: Vec<merkle::Hash> = proof["audit_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hash| merkle::from_hex(hash.as_str().unwrap()).unwrap())
        .collect();
    let root = merkle::from_hex(proof["root_hash"].as_str().unwrap()).unwrap();
    assert!(merkle::verify_inclusion(
        &leaf,
        2,
        size as u64,
        &path,
        &root
    ));
    assert!(!merkle::verify_inclusion(
        &leaf,
        3,
        size as u64,
        &path,
        &root
    ));
    let (_, exported) = audit_cli(&app, &["checkpoints"]);
    assert!(
        exported.contains(&merkle::to_hex(&root)),
        "the proof's root is a signed checkpoint"
    );
    // Consistency between the two checkpoints.
    let later = app
        .count("SELECT MAX(tree_size) FROM audit_checkpoints")
        .await;
    let (status, consistency) = get(
        &format!("_audit/consistency?from={size}&to={later}"),
        &auditor,
    )
    .await;
    assert_eq!(status, 200);
    let hashes: Vec<merkle::Hash> = consistency["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hash| merkle::from_hex(hash.as_str().unwrap()).unwrap())
        .collect();
    let old_root = merkle::from_hex(consistency["old_root"].as_str().unwrap()).unwrap();
    let new_root = merkle::from_hex(consistency["new_root"].as_str().unwrap()).unwrap();
    assert_eq!(old_root, root);
    assert!(merkle::verify_consistency(
        size as u64,
        later as u64,
        &old_root,
        &new_root,
        &hashes
    ));

    // AuditEvents: compliance officers read and search; others may not; nobody writes.
    let (status, bundle) = get("AuditEvent?subtype=create&outcome=0&_count=50", &auditor).await;
    assert_eq!(status, 200);
    let events = bundle["entry"].as_array().unwrap();
    assert_eq!(events.len(), 10, "the ten creates");
    assert_eq!(events[0]["resource"]["resourceType"], "AuditEvent");
    let id = events[0]["resource"]["id"].as_str().unwrap().to_string();
    let (status, event) = get(&format!("AuditEvent/{id}"), &auditor).await;
    assert_eq!(status, 200);
    assert_eq!(event["action"], "C");
    // One failed authentication, found by the DICOM "User Authentication" type.
    let refused = app
        .anonymous
        .get(app.url("Patient/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let (status, logins) = get(
        "AuditEvent?type=http://dicom.nema.org/resources/ontology/DCM|110114",
        &auditor,
    )
    .await;
    assert_eq!(status, 200);
    let logins = logins["entry"].as_array().unwrap();
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0]["resource"]["outcome"], "4");
    assert_eq!(
        app.get("AuditEvent?subtype=create").await.status(),
        403,
        "ehr-system may not"
    );
    let post = app.create(&json!({"resourceType": "AuditEvent"})).await;
    assert_eq!(post.status(), 405);
    // The disclosure report of one patient: who read it, and why.
    let patient = app.create_id(&json!({"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner/gp"}]})).await;
    let doctor = app.token(DevTokenRequest {
        subject: "dr-gp".into(),
        roles: vec!["practitioner".into()],
        fhir_user: Some("Practitioner/gp".into()),
        scope: "user/*.cruds".into(),
        purpose_of_use: Some("TREAT".into()),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    });
    let (status, _) = get(&format!("Patient/{patient}"), &doctor).await;
    assert_eq!(status, 200);
    let (status, report) = get(
        &format!("_audit/disclosures?patient=Patient/{patient}&_format=report"),
        &auditor,
    )
    .await;
    assert_eq!(status, 200);
    let disclosures = report["disclosures"].as_array().unwrap();
    let by_doctor: Vec<&Value> = disclosures
        .iter()
        .filter(|entry| entry["who"]["subject"] == "dr-gp")
        .collect();
    assert_eq!(by_doctor.len(), 1, "{report}");
    assert_eq!(by_doctor[0]["why"], "TREAT");
    assert_eq!(by_doctor[0]["what"]["interaction"], "read");
    let (status, bundle) = get(
        &format!("_audit/disclosures?patient=Patient/{patient}"),
        &auditor,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bundle["type"], "collection");
    let _ = repo_dir();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_sqlite() {
    proofs_and_compliance_endpoints(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_postgres() {
    proofs_and_compliance_endpoints(Backend::Postgres).await;
}

/// Ends every session on the app's PostgreSQL database but the caller's own, as a database
/// restart or an administrator would.
async fn terminate_sessions(app: &TestApp) {
    use sqlx::Connection;
    let (server, database) = app
        .database_url
        .rsplit_once('/')
        .expect("a database URL ends with its name");
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("connect to PostgreSQL");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .expect("pg_terminate_backend");
    assert!(ended.contains(&true), "no session was ended");
}

/// A group-commit writer keeps a connection of its own (out of the pool, which pings on every
/// acquire and release). When the database ends it: one used within the last second fails
/// one group (503, nothing returned) and is replaced for the next; one idle longer is pinged
/// and replaced before it is used, so no read fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writer_connection_is_replaced_postgres() {
    // One writer, so that the reads below all go through the same connection.
    let Some(app) = spawn_app_with(Backend::Postgres, |settings| settings.audit.writers = 1).await
    else {
        return;
    };
    let id = app
        .create_id(&json!({"resourceType": "Patient", "name": [{"family": "Held"}]}))
        .await;
    let read = || async { app.get(&format!("Patient/{id}")).await.status().as_u16() };
    assert_eq!(read().await, 200);

    // Used a moment ago: at most the next read fails, and the ones after it are served.
    terminate_sessions(&app).await;
    let statuses = [read().await, read().await, read().await];
    assert!(
        matches!(statuses, [200 | 503, 200, 200]),
        "reads after the writer's connection ended: {statuses:?}"
    );

    // Idle for longer than the check interval: pinged and replaced before use.
    terminate_sessions(&app).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    assert_eq!(
        read().await,
        200,
        "a read after an idle writer's connection ended"
    );
    assert_eq!(read().await, 200);
}
