//! Fault injection on PostgreSQL: the server's promises while what it depends on fails, each
//! failure made real (a KMS that cannot be reached, database connections terminated by the
//! server, processes killed with SIGKILL, two nodes racing) and each outcome checked in the
//! database afterwards, not only in the answers.
//!
//! - [`kms_outage_during_a_write_burst`]: the KMS goes away (refused, then hung) under concurrent
//!   creates and comes back: every request succeeded fully or got 503, nothing acknowledged is
//!   lost, every stored version has its audit record, no plaintext reached the database, and
//!   writes succeed again without a restart.
//! - [`postgres_connections_killed_during_transactions`]: `pg_terminate_backend` on every
//!   connection of the server, again and again, while transaction Bundles run: each Bundle is
//!   all or nothing (resources, index rows, audit records), failures are 503, and the pool
//!   recovers by itself.
//! - [`server_killed_during_import_and_export`]: SIGKILL of `custodian import` and of the
//!   server (a child process started from a config file) in the middle of a run, then of the
//!   server during a Bulk Data export: acknowledged writes survive, `custodian audit verify`
//!   passes, a re-run of the import completes without writing anything twice, and the export
//!   ends (completed or failed), never stuck.
//! - [`statement_of_a_timed_out_request_is_cancelled`]: a read blocked on a lock past the
//!   request timeout answers 503, and its statement is cancelled by PostgreSQL at the
//!   configured limit rather than left waiting; the server serves the read once the lock is gone.
//! - [`two_server_processes_race_on_if_match`]: two server processes on one database, racing
//!   conditional updates with the same `If-Match` under background load: exactly one winner
//!   per race, no lost update, one audit tree that verifies.
//!
//! Each test prints one line starting with `fault-figures:` (requests sent, acknowledged,
//! present after recovery, …):
//! `cargo test --test api faults -- --nocapture 2>&1 | grep fault-figures`.
//!
//! PostgreSQL only: they are skipped like every PostgreSQL test when no server is reachable
//! (a failure with CI=true); the KMS scenario also needs the moto emulator and the OpenID
//! provider (tests/api/moto.rs, tests/api/oidc.rs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};

use crate::encryption::{canary_patient, contains, database_bytes, encodings, CANARY};
use crate::helpers::{
    dev_token, ehr_system, postgres_server_url, postgres_test_database, repo_dir, spawn_app,
    spawn_app_with, testdata_dir, Backend, FHIR_JSON,
};
use crate::moto::MotoServer;
use crate::oidc::OidcProvider;

/// How often a test looks again at what it waits for.
const POLL: Duration = Duration::from_millis(20);

/// A bound on one wait, named for the failure message.
struct Deadline {
    end: Instant,
    what: &'static str,
}

impl Deadline {
    fn after(limit: Duration, what: &'static str) -> Deadline {
        Deadline {
            end: Instant::now() + limit,
            what,
        }
    }

    /// Sleeps one poll interval; panics once the deadline has passed.
    async fn tick(&self) {
        assert!(
            Instant::now() < self.end,
            "timed out waiting for {}",
            self.what
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A connection of the test's own to a test database, to check what the server left there.
struct Db {
    connection: PgConnection,
}

impl Db {
    async fn connect(url: &str) -> Db {
        Db {
            connection: PgConnection::connect(url)
                .await
                .expect("connect to the test database"),
        }
    }

    /// One integer (a `COUNT(*)` or another BIGINT).
    async fn count(&mut self, sql: &str) -> i64 {
        sqlx::query(sql)
            .fetch_one(&mut self.connection)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
            .get::<i64, _>(0)
    }

    /// The text values of the first column.
    async fn strings(&mut self, sql: &str) -> Vec<String> {
        sqlx::query(sql)
            .fetch_all(&mut self.connection)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
            .iter()
            .map(|row| row.get::<String, _>(0))
            .collect()
    }

    /// `key → count` from a query selecting (TEXT, BIGINT) rows.
    async fn counts_by(&mut self, sql: &str) -> HashMap<String, i64> {
        sqlx::query(sql)
            .fetch_all(&mut self.connection)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1)))
            .collect()
    }

    /// Waits until the audit sequencer has placed every committed record in the log.
    async fn wait_until_sequenced(&mut self) {
        let deadline = Deadline::after(Duration::from_secs(20), "every audit record in the log");
        while self
            .count(
                "SELECT COUNT(*) FROM audit_records r \
                 WHERE NOT EXISTS (SELECT 1 FROM audit_log l WHERE l.record_id = r.record_id)",
            )
            .await
            > 0
        {
            deadline.tick().await;
        }
    }
}

/// A reqwest client sending `token`.
fn client_with(token: &str) -> reqwest::Client {
    custodian::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Whether `body` is an OperationOutcome whose first issue has `code`.
fn is_outcome(body: &Value, code: &str) -> bool {
    body["resourceType"] == "OperationOutcome" && body["issue"][0]["code"] == code
}

// ---------------------------------------------------------------------------------------------
// 1. The KMS goes away during a write burst.
// ---------------------------------------------------------------------------------------------

/// A TCP link between the server and the KMS emulator that the test cuts and restores.
///
/// Why not stop and restart the emulator: moto keeps its keys in memory only, so a restarted
/// moto has lost the key that wrapped every data key in the database, which no real KMS outage
/// does (AWS KMS keeps its keys through any outage of the service or the network). So the
/// emulator keeps running and the outage is made where one happens: on the way to it. Cutting
/// the link closes the listening port (new connections are refused, as when the KMS host is
/// down) and drops every open connection mid-stream (as when it crashes); restoring it listens
/// on the same port again. The test then also freezes the emulator itself with SIGSTOP (the
/// kernel still accepts connections, nothing answers: a KMS that hangs), and thaws it.
struct KmsLink {
    port: u16,
    target: SocketAddr,
    accepting: Option<tokio::task::JoinHandle<()>>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl KmsLink {
    /// A link to `target_url` (`http://127.0.0.1:PORT`) on a free local port, open.
    async fn open(target_url: &str) -> KmsLink {
        let target: SocketAddr = target_url
            .trim_start_matches("http://")
            .parse()
            .expect("the emulator's address");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the KMS link");
        let mut link = KmsLink {
            port: listener.local_addr().expect("address").port(),
            target,
            accepting: None,
            connections: Arc::default(),
        };
        link.serve(listener);
        link
    }

    /// The endpoint the server is configured with.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let connections = self.connections.clone();
        self.accepting = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let forwarding = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections.lock().unwrap().push(forwarding);
            }
        }));
    }

    /// The outage: the port closes and every open connection is dropped.
    async fn cut(&mut self) {
        if let Some(accepting) = self.accepting.take() {
            accepting.abort();
            // Only once the task is gone is its listener closed (and the port free again).
            let _ = accepting.await;
        }
        let open: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        for connection in open {
            connection.abort();
            let _ = connection.await;
        }
    }

    /// The KMS is back, on the same address.
    async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("listen on the KMS link's port again");
        self.serve(listener);
    }
}

impl Drop for KmsLink {
    fn drop(&mut self) {
        if let Some(accepting) = self.accepting.take() {
            accepting.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// One request of the burst and what became of it.
#[derive(Debug, Clone)]
struct Sent {
    /// The burst's phase when the request was sent (see [`Phase`]).
    phase: usize,
    resource_type: &'static str,
    status: u16,
    /// The id of an acknowledged create.
    id: Option<String>,
    /// A 503 that is an OperationOutcome `transient` with `Retry-After`.
    transient_outcome: bool,
}

/// The phases of the burst.
struct Phase;

impl Phase {
    const BEFORE: usize = 0;
    const REFUSED: usize = 1;
    const RESTORED: usize = 2;
    const HUNG: usize = 3;
    const THAWED: usize = 4;
}

struct Burst {
    stop: AtomicBool,
    phase: AtomicUsize,
    next: AtomicUsize,
    sent: Mutex<Vec<Sent>>,
}

impl Burst {
    fn count(&self, phase: usize, status: u16) -> usize {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|sent| sent.phase == phase && sent.status == status)
            .count()
    }

    /// Waits until `phase` has at least `at_least` answers with `status`.
    async fn wait_for(&self, phase: usize, status: u16, at_least: usize, what: &'static str) {
        let deadline = Deadline::after(Duration::from_secs(30), what);
        while self.count(phase, status) < at_least {
            deadline.tick().await;
        }
    }
}

/// An Observation in `patient`'s compartment, whose data key is in the server's cache.
fn canary_observation(patient: &str, index: usize) -> Value {
    json!({
        "resourceType": "Observation", "status": "final",
        "code": {"text": format!("{CANARY} burst finding {index}")},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueString": format!("{CANARY} burst value {index}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_outage_during_a_write_burst() {
    const AUDIENCE: &str = "urn:custodian:test-faults";
    const WORKERS: usize = 6;
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let Some(oidc) = OidcProvider::start(&[AUDIENCE]).await else {
        return;
    };
    let key_id = moto.create_key().await;
    let mut link = KmsLink::open(&moto.endpoint_url()).await;
    let endpoint = link.url();
    let issuer = oidc.issuer().to_string();
    let Some(mut app) = spawn_app_with(Backend::Postgres, |settings| {
        settings.auth.dev_issuer = custodian::config::DevIssuerMode::Off;
        settings.auth.issuers = issuer;
        settings.auth.audience = Some(AUDIENCE.into());
        settings.keys.provider = custodian::config::KeyProviderKind::Aws;
        settings.keys.aws_key_id = Some(key_id);
        settings.keys.aws_endpoint_url = Some(endpoint);
        settings.keys.aws_region = Some("us-east-1".into());
        settings.keys.timeout_ms = 1000;
    })
    .await
    else {
        return;
    };
    app.use_token(&oidc.client_secret_token("system/*.cruds", AUDIENCE).await);
    // A patient made before the burst: Observations in their compartment use a cached data key,
    // new Patients each need a new one from the KMS (GenerateDataKey).
    let anchor = app.create_id(&canary_patient(0)).await;

    let burst = Arc::new(Burst {
        stop: AtomicBool::new(false),
        phase: AtomicUsize::new(Phase::BEFORE),
        next: AtomicUsize::new(1),
        sent: Mutex::new(Vec::new()),
    });
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let burst = burst.clone();
        let client = app.client.clone();
        let base_url = app.base_url.clone();
        let anchor = anchor.clone();
        workers.push(tokio::spawn(async move {
            while !burst.stop.load(Ordering::SeqCst) {
                let phase = burst.phase.load(Ordering::SeqCst);
                let index = burst.next.fetch_add(1, Ordering::SeqCst);
                let (resource_type, resource) = if index.is_multiple_of(3) {
                    ("Observation", canary_observation(&anchor, index))
                } else {
                    ("Patient", canary_patient(index))
                };
                let response = client
                    .post(format!("{base_url}/{resource_type}"))
                    .header("content-type", FHIR_JSON)
                    .body(resource.to_string())
                    .send()
                    .await
                    .expect("the server answers");
                let status = response.status().as_u16();
                let retry_after = response.headers().contains_key("retry-after");
                let body: Value = response.json().await.unwrap_or(Value::Null);
                burst.sent.lock().unwrap().push(Sent {
                    phase,
                    resource_type,
                    status,
                    id: body["id"]
                        .as_str()
                        .filter(|_| status == 201)
                        .map(str::to_string),
                    transient_outcome: retry_after && is_outcome(&body, "transient"),
                });
            }
        }));
    }

    burst
        .wait_for(Phase::BEFORE, 201, 15, "writes before the outage")
        .await;
    burst.phase.store(Phase::REFUSED, Ordering::SeqCst);
    link.cut().await;
    burst
        .wait_for(Phase::REFUSED, 503, 12, "503s while the KMS is unreachable")
        .await;
    link.restore().await;
    burst.phase.store(Phase::RESTORED, Ordering::SeqCst);
    burst
        .wait_for(Phase::RESTORED, 201, 15, "writes once the KMS is back")
        .await;
    burst.phase.store(Phase::HUNG, Ordering::SeqCst);
    moto.pause();
    burst
        .wait_for(Phase::HUNG, 503, 8, "503s while the KMS hangs")
        .await;
    moto.resume();
    burst.phase.store(Phase::THAWED, Ordering::SeqCst);
    burst
        .wait_for(Phase::THAWED, 201, 15, "writes once the KMS answers again")
        .await;
    burst.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("a burst worker");
    }
    let sent = burst.sent.lock().unwrap().clone();

    // Every answer was a full success or a 503 OperationOutcome with Retry-After.
    for request in &sent {
        assert!(
            (request.status == 201 && request.id.is_some())
                || (request.status == 503 && request.transient_outcome),
            "a create answered {} (phase {}, {})",
            request.status,
            request.phase,
            request.resource_type
        );
    }
    let acknowledged: Vec<&Sent> = sent
        .iter()
        .filter(|request| request.status == 201)
        .collect();
    let failed = sent.len() - acknowledged.len();
    // Every acknowledged write reads back, with its content.
    let mut present = 0;
    for request in &acknowledged {
        let path = format!("{}/{}", request.resource_type, request.id.as_ref().unwrap());
        let read = app.get_json(&path, 200).await;
        assert!(read.to_string().contains(CANARY), "{path} reads back");
        present += 1;
    }
    // Nothing else was written: a 503 left no version, no half.
    let mut db = Db::connect(&app.database_url).await;
    let patients = acknowledged
        .iter()
        .filter(|request| request.resource_type == "Patient")
        .count() as i64;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM resource_heads WHERE resource_type = 'Patient'")
            .await,
        patients + 1,
        "stored Patients = acknowledged creates + the anchor"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM resource_versions").await,
        acknowledged.len() as i64 + 1,
        "stored versions = acknowledged creates + the anchor"
    );
    // Every stored version has its audit record, and every request left exactly one.
    let unaudited = db
        .count(
            "SELECT COUNT(*) FROM resource_versions v WHERE NOT EXISTS (SELECT 1 FROM audit_records a \
             WHERE a.resource_type = v.resource_type AND a.resource_id = v.resource_id \
               AND a.interaction = 'create' AND a.outcome = 201)",
        )
        .await;
    assert_eq!(unaudited, 0, "stored versions without their audit record");
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'create' AND outcome = 201"
        )
        .await,
        acknowledged.len() as i64 + 1
    );
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'create' AND outcome = 503"
        )
        .await,
        failed as i64,
        "each refused create is audited as such"
    );
    // No plaintext anywhere in the database, in clear, hex or base64.
    let bytes = database_bytes(&app);
    let mut canary_hits = 0;
    for form in encodings(CANARY)
        .iter()
        .chain(encodings(&CANARY.to_lowercase()).iter())
    {
        if contains(&bytes, form) {
            canary_hits += 1;
        }
    }
    assert_eq!(canary_hits, 0, "a canary is in the database in clear");
    // The KMS is back: writes succeed on the same server, no restart.
    let after = app.create_id(&canary_patient(100_000)).await;
    app.get_json(&format!("Patient/{after}"), 200).await;

    let in_phase = |phase: usize, status: u16| burst.count(phase, status);
    eprintln!(
        "fault-figures: kms-outage (PostgreSQL, aws provider, moto) sent={} acknowledged={} \
         failed_503={failed} present_after_recovery={present} unaudited={unaudited} \
         canary_hits={canary_hits} | by phase 201/503: before={}/{} refused={}/{} restored={}/{} \
         hung={}/{} thawed={}/{}",
        sent.len(),
        acknowledged.len(),
        in_phase(Phase::BEFORE, 201),
        in_phase(Phase::BEFORE, 503),
        in_phase(Phase::REFUSED, 201),
        in_phase(Phase::REFUSED, 503),
        in_phase(Phase::RESTORED, 201),
        in_phase(Phase::RESTORED, 503),
        in_phase(Phase::HUNG, 201),
        in_phase(Phase::HUNG, 503),
        in_phase(Phase::THAWED, 201),
        in_phase(Phase::THAWED, 503),
    );
}

// ---------------------------------------------------------------------------------------------
// 2. PostgreSQL terminates the server's connections during transactions.
// ---------------------------------------------------------------------------------------------

/// The identifier system of the transaction scenario's Patients (`tx-K` for Bundle K).
const TX_SYSTEM: &str = "urn:custodian:faults:tx";
/// Observations per transaction Bundle (each with a Patient: one more entry).
const TX_OBSERVATIONS: usize = 3;

/// Transaction Bundle `k`: a new Patient (POST, referenced by its `urn:uuid`) and
/// [`TX_OBSERVATIONS`] Observations with client ids `ftx-K-J` (PUT, update as create).
fn transaction_bundle(k: usize) -> Value {
    let patient_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let mut entries = vec![json!({
        "fullUrl": patient_url,
        "resource": {"resourceType": "Patient", "active": true,
                     "identifier": [{"system": TX_SYSTEM, "value": format!("tx-{k}")}]},
        "request": {"method": "POST", "url": "Patient"}
    })];
    for j in 0..TX_OBSERVATIONS {
        let id = format!("ftx-{k}-{j}");
        entries.push(json!({
            "resource": {"resourceType": "Observation", "id": id, "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                         "subject": {"reference": patient_url},
                         "valueQuantity": {"value": j, "unit": "/min",
                                           "system": "http://unitsofmeasure.org", "code": "/min"}},
            "request": {"method": "PUT", "url": format!("Observation/{id}")}
        }));
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// POSTs a Bundle to `/`: the status and the body.
async fn post_bundle(client: &reqwest::Client, base_url: &str, bundle: &Value) -> (u16, Value) {
    let response = client
        .post(format!("{base_url}/"))
        .header("content-type", FHIR_JSON)
        .body(bundle.to_string())
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_killed_during_transactions() {
    const WORKERS: usize = 6;
    const PER_WORKER: usize = 10;
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let database = app
        .database_url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_string();

    // Terminates every backend of the test database (the server's pool, its audit writer and
    // sequencer) again and again until told to stop. The pauses between rounds vary from 0.15 to
    // 1.05 s — a cadence, not a synchronisation: the six concurrent transactions take a few
    // hundred milliseconds each here, so some rounds cut them mid-way and some let them through.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut admin = PgConnection::connect(&format!("{}/postgres", postgres_server_url()))
                .await
                .expect("connect to PostgreSQL");
            let mut terminated = 0usize;
            let mut rounds = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let killed: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&database)
                .fetch_all(&mut admin)
                .await
                .expect("pg_terminate_backend");
                terminated += killed.into_iter().filter(|killed| *killed).count();
                rounds += 1;
                let pause = 150 + 300 * (rounds % 4) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            (terminated, rounds)
        })
    };

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let client = app.client.clone();
        let base_url = app.base_url.clone();
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in 0..PER_WORKER {
                let k = worker * PER_WORKER + n;
                let (status, body) = post_bundle(&client, &base_url, &transaction_bundle(k)).await;
                answers.push((k, status, body));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(worker.await.expect("a transaction worker"));
    }
    stop.store(true, Ordering::SeqCst);
    let (terminated, kill_rounds) = killer.await.expect("the killer");
    assert!(terminated > 0, "no connection was terminated");

    // The same server, not restarted, serves at once: the pool replaced its dead connections.
    let mut recovered = 0;
    for k in 1000..1005 {
        let (status, body) = post_bundle(&app.client, &app.base_url, &transaction_bundle(k)).await;
        assert_eq!(status, 200, "a transaction after the kills: {body}");
        let location = body["entry"][0]["response"]["location"]
            .as_str()
            .expect("a location");
        app.get_json(location, 200).await;
        recovered += 1;
    }

    // What each transaction left: all of it or nothing, in every table.
    let mut db = Db::connect(&app.database_url).await;
    let by_bundle = "split_part(resource_id, '-', 2)";
    let observations = "resource_type = 'Observation' AND resource_id LIKE 'ftx-%'";
    let heads = db
        .counts_by(&format!(
            "SELECT {by_bundle}, COUNT(*) FROM resource_heads WHERE {observations} GROUP BY 1"
        ))
        .await;
    let versions = db
        .counts_by(&format!(
            "SELECT {by_bundle}, COUNT(*) FROM resource_versions WHERE {observations} GROUP BY 1"
        ))
        .await;
    let terms = db
        .counts_by(&format!(
            "SELECT {by_bundle}, COUNT(DISTINCT resource_id) FROM search_terms WHERE {observations} GROUP BY 1"
        ))
        .await;
    let numbers = db
        .counts_by(&format!(
            "SELECT {by_bundle}, COUNT(DISTINCT resource_id) FROM search_numbers WHERE {observations} GROUP BY 1"
        ))
        .await;
    let audited = db
        .counts_by(&format!(
            "SELECT {by_bundle}, COUNT(*) FROM audit_records WHERE {observations} \
             AND outcome BETWEEN 200 AND 299 GROUP BY 1"
        ))
        .await;
    let mut acknowledged = 0;
    let mut failed = 0;
    let mut present_after_recovery = 0;
    let mut acknowledged_present = 0;
    for (k, status, body) in &answers {
        let key = k.to_string();
        let stored = heads.get(&key).copied().unwrap_or(0);
        let found = app
            .get_json(
                &format!("Patient?identifier={TX_SYSTEM}|tx-{k}&_summary=count"),
                200,
            )
            .await["total"]
            .as_i64()
            .expect("a total");
        let full = TX_OBSERVATIONS as i64;
        assert!(
            (stored == 0 && found == 0) || (stored == full && found == 1),
            "transaction {k} ({status}) is partly stored: {stored} Observations, {found} Patients"
        );
        for (what, rows) in [
            ("versions", &versions),
            ("index terms", &terms),
            ("index numbers", &numbers),
            ("audit records", &audited),
        ] {
            assert_eq!(
                rows.get(&key).copied().unwrap_or(0),
                stored,
                "transaction {k} ({status}): {what} of its Observations"
            );
        }
        if stored > 0 {
            present_after_recovery += 1;
            // The Patient is indexed, audited once, and the Observations point at it.
            let patients = app
                .get_json(&format!("Patient?identifier={TX_SYSTEM}|tx-{k}"), 200)
                .await;
            let patient = patients["entry"][0]["resource"]["id"]
                .as_str()
                .expect("the Patient")
                .to_string();
            assert_eq!(
                db.count(&format!(
                    "SELECT COUNT(*) FROM audit_records WHERE resource_type = 'Patient' \
                     AND resource_id = '{patient}' AND outcome = 201"
                ))
                .await,
                1,
                "transaction {k}: the Patient's audit record"
            );
            let observation = app.get_json(&format!("Observation/ftx-{k}-0"), 200).await;
            assert_eq!(
                observation["subject"]["reference"],
                format!("Patient/{patient}")
            );
        }
        if *status == 200 {
            acknowledged += 1;
            assert_eq!(
                stored, full,
                "acknowledged transaction {k} is not all there"
            );
            acknowledged_present += 1;
        } else {
            failed += 1;
            assert_eq!(*status, 503, "transaction {k} failed with {status}: {body}");
            assert!(is_outcome(body, "transient"), "transaction {k}: {body}");
            assert_eq!(
                stored, 0,
                "transaction {k} answered 503 ('nothing was written, retry') but was committed"
            );
        }
    }
    assert!(acknowledged > 0, "no transaction got through the kills");
    assert!(failed > 0, "no transaction was hit by the kills");
    // Nothing stored without its audit record, anywhere.
    let unaudited = db
        .count(
            "SELECT COUNT(*) FROM resource_versions v WHERE NOT EXISTS (SELECT 1 FROM audit_records a \
             WHERE a.resource_type = v.resource_type AND a.resource_id = v.resource_id \
               AND a.outcome BETWEEN 200 AND 299)",
        )
        .await;
    assert_eq!(unaudited, 0, "stored versions without their audit record");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM audit_records WHERE interaction = 'transaction' AND outcome = 200")
            .await,
        (acknowledged + recovered) as i64,
        "one record per acknowledged transaction"
    );
    db.wait_until_sequenced().await;
    crate::encryption::custodian(&app, &["audit", "verify"]);

    eprintln!(
        "fault-figures: pg-terminate-backend transactions={} entries_each={} acknowledged={acknowledged} \
         failed_503={failed} present_after_recovery={present_after_recovery} \
         acknowledged_present={acknowledged_present} partial=0 unaudited={unaudited} \
         backends_terminated={terminated} kill_rounds={kill_rounds} \
         requests_after_kills_ok={recovered}/5 audit_verify=ok",
        answers.len(),
        TX_OBSERVATIONS + 1,
    );
}

// ---------------------------------------------------------------------------------------------
// Server processes (scenarios 3 and 4).
// ---------------------------------------------------------------------------------------------

/// A data directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("custodian-{label}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Writes the TOML configuration of a server process (as an operator would) into `data_dir`.
fn write_config(data_dir: &Path, name: &str, port: u16, database_url: &str) -> PathBuf {
    let text = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = {data_dir:?}
database_url = {database_url:?}
profiles_dir = {profiles:?}
max_connections = 8

[auth]
dev_issuer = "on"
policies_dir = {policies:?}

[audit]
catalog_dir = {catalog:?}
checkpoint_every_records = 200
checkpoint_every_secs = 1

[export]
# Small batches and a short lease: a job spans many batches, and the job of a killed node is
# taken over two seconds after its last renewal.
batch_size = 25
lease_secs = 2
poll_ms = 100
"#,
        data_dir = data_dir.display().to_string(),
        profiles = repo_dir().join("fhir-profiles").display().to_string(),
        policies = repo_dir().join("policies").display().to_string(),
        catalog = repo_dir().join("audit").display().to_string(),
    );
    let path = data_dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the config file");
    path
}

/// `custodian --config FILE serve` as a child process, killed the way a crash kills it.
struct ServerProcess {
    config: PathBuf,
    base_url: String,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts the server and waits until it is ready.
    async fn start(config: PathBuf, port: u16) -> ServerProcess {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("faults-server-{port}-{}.log", uuid::Uuid::new_v4()));
        let mut server = ServerProcess {
            config,
            base_url: format!("http://127.0.0.1:{port}"),
            log,
            child: None,
        };
        server.run().await;
        server
    }

    /// Starts the process (again) and polls `/ready`.
    async fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server log");
        let child = Command::new(env!("CARGO_BIN_EXE_custodian"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("CUSTODIAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the log"))
            .stderr(log)
            .spawn()
            .expect("start custodian serve");
        self.child = Some(child);
        custodian::install_crypto_provider();
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Deadline::after(Duration::from_secs(30), "the server process to be ready");
        loop {
            let ready = probe.get(format!("{}/ready", self.base_url)).send().await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return;
            }
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                panic!(
                    "the server exited ({status}) before it was ready; see {}",
                    self.log.display()
                );
            }
            deadline.tick().await;
        }
    }

    /// SIGKILL: no shutdown, no draining, no final flush.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL the server");
            child.wait().expect("reap the server");
        }
    }

    /// A client with a token of the suite's EHR system for this server.
    fn client(&self, data_dir: &Path) -> reqwest::Client {
        client_with(&dev_token(data_dir, &self.base_url, ehr_system()))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `custodian --config FILE ARGS…` to its end.
fn custodian_cli(config: &Path, arguments: &[&str]) -> (bool, String, String) {
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_custodian"))
            .arg("--config")
            .arg(config)
            .args(arguments)
            .env("CUSTODIAN_LOG", "warn")
            .env("USER", "fault-import")
            .output()
            .expect("run custodian")
    });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `custodian audit verify` must pass.
fn audit_verifies(config: &Path) {
    let (ok, stdout, stderr) = custodian_cli(config, &["audit", "verify"]);
    assert!(ok, "custodian audit verify failed: {stdout}{stderr}");
}

/// Clients creating Observations on a server, one every `pause`, until `stop`; each returns
/// (sent, acknowledged ids).
fn spawn_writers(
    client: &reqwest::Client,
    base_url: &str,
    workers: usize,
    label: &'static str,
    pause: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..workers)
        .map(|worker| {
            let client = client.clone();
            let url = format!("{base_url}/Observation");
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                let mut acknowledged = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    sent += 1;
                    let observation = json!({
                        "resourceType": "Observation", "status": "final",
                        "code": {"text": format!("{label} {worker}-{sent}")}
                    });
                    let response = client
                        .post(&url)
                        .header("content-type", FHIR_JSON)
                        .body(observation.to_string())
                        .send()
                        .await;
                    match response {
                        Ok(response) if response.status() == 201 => {
                            let body: Value = response.json().await.expect("a created resource");
                            acknowledged.push(body["id"].as_str().expect("an id").to_string());
                            tokio::time::sleep(pause).await;
                        }
                        Ok(response) => panic!(
                            "a create answered {}: {}",
                            response.status(),
                            response.text().await.unwrap_or_default()
                        ),
                        // The server died under the request: not acknowledged.
                        Err(_) => {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            tokio::time::sleep(POLL).await;
                        }
                    }
                }
                (sent, acknowledged)
            })
        })
        .collect()
}

/// Every `Type/id` of a directory of NDJSON files.
fn ndjson_keys(directory: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(directory).expect("test data") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("ndjson");
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let resource: Value = serde_json::from_str(line).expect("a resource");
            keys.insert(format!(
                "{}/{}",
                resource["resourceType"].as_str().unwrap(),
                resource["id"].as_str().unwrap()
            ));
        }
    }
    keys
}

/// A request abandoned at its timeout while its statement waits for a lock held elsewhere:
/// the server answers 503, and PostgreSQL cancels the statement at the statement limit
/// instead of keeping it (and a backend) waiting for as long as the lock is held. Once the lock
/// is gone the same read succeeds, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_of_a_timed_out_request_is_cancelled() {
    let Some(app) = spawn_app_with(Backend::Postgres, |settings| {
        settings.request_timeout_secs = 1;
        settings.statement_timeout_secs = 3;
    })
    .await
    else {
        return;
    };
    let id = app
        .create_id(&json!({"resourceType": "Patient", "gender": "female"}))
        .await;
    let waiting_for_a_lock = "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock' \
         AND pid <> pg_backend_pid()";

    let mut locker = Db::connect(&app.database_url).await;
    sqlx::raw_sql("BEGIN; LOCK TABLE resource_heads, resource_versions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker.connection)
        .await
        .expect("lock the resource tables");
    let asked = Instant::now();
    let answer = app.get(&format!("/Patient/{id}")).await;
    let answered_after = asked.elapsed();
    assert_eq!(
        answer.status(),
        503,
        "a read blocked past the request timeout"
    );
    assert!(
        !answer.text().await.unwrap_or_default().contains(&id),
        "the 503 carries no resource"
    );

    let mut watcher = Db::connect(&app.database_url).await;
    assert!(
        watcher.count(waiting_for_a_lock).await >= 1,
        "the abandoned read's statement is still waiting right after the 503"
    );
    let deadline = Deadline::after(
        Duration::from_secs(10),
        "PostgreSQL to cancel the abandoned statement while the lock is still held",
    );
    while watcher.count(waiting_for_a_lock).await > 0 {
        deadline.tick().await;
    }
    let cancelled_after = asked.elapsed();
    assert!(
        cancelled_after >= Duration::from_secs(3),
        "cancelled by the 3 s statement limit, not before (after {cancelled_after:?})"
    );

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker.connection)
        .await
        .expect("release the lock");
    let again = app.get(&format!("/Patient/{id}")).await;
    assert_eq!(
        again.status(),
        200,
        "the read succeeds once the lock is gone"
    );
    println!(
        "fault-figures: statement-timeout: 503 after {answered_after:?}, statement cancelled \
         after {cancelled_after:?} with the lock still held"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. SIGKILL during an import and during an export.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_during_import_and_export() {
    let Some(database_url) = postgres_test_database().await else {
        return;
    };
    let data = TempDir::new("faults-kill");
    let port = free_port();
    let config = write_config(&data.0, "server", port, &database_url);
    let mut server = ServerProcess::start(config.clone(), port).await;
    let mut db = Db::connect(&database_url).await;
    // The bulk NDJSON set without its largest file (555 Conditions): 374 resources of eight
    // types, so that a debug build imports it twice within the test's time.
    let dataset = data.0.join("bulk-ndjson");
    std::fs::create_dir_all(&dataset).expect("a data set directory");
    for file in
        std::fs::read_dir(testdata_dir().join("bulk-ndjson-10-patients")).expect("test data")
    {
        let file = file.expect("a file").path();
        if !file.ends_with("Condition.000.ndjson") {
            std::fs::copy(&file, dataset.join(file.file_name().unwrap())).expect("copy");
        }
    }
    let imported_keys = ndjson_keys(&dataset);

    // (a) An import and HTTP writes at once; both processes are killed in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(
        &server.client(&data.0),
        &server.base_url,
        2,
        "during import",
        Duration::from_millis(50),
        &stop,
    );
    let import_log = data.0.join("import.log");
    let mut import = Command::new(env!("CARGO_BIN_EXE_custodian"))
        .arg("--config")
        .arg(&config)
        .args(["import", "--quiet"])
        .arg(&dataset)
        .env("CUSTODIAN_LOG", "warn")
        .env("USER", "fault-import")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&import_log).expect("import log"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start custodian import");
    // Wait until the import has committed one of its 100-resource chunks.
    let deadline = Deadline::after(Duration::from_secs(40), "the import to write 100 resources");
    while db
        .count(
            "SELECT COUNT(*) FROM audit_records WHERE agent = 'operator:fault-import' AND outcome = 201",
        )
        .await
        < 100
    {
        deadline.tick().await;
    }
    assert!(
        import.try_wait().expect("the import's state").is_none(),
        "the import finished before it could be killed: nothing was injected"
    );
    import.kill().expect("SIGKILL the import");
    server.kill();
    import.wait().expect("reap the import");
    stop.store(true, Ordering::SeqCst);
    let mut sent = 0;
    let mut acknowledged = Vec::new();
    for writer in writers {
        let (writer_sent, writer_acknowledged) = writer.await.expect("a writer");
        sent += writer_sent;
        acknowledged.extend(writer_acknowledged);
    }
    assert!(!acknowledged.is_empty(), "no HTTP write was acknowledged");
    let keys_in = |rows: Vec<String>| -> BTreeSet<String> { rows.into_iter().collect() };
    let stored = keys_in(
        db.strings("SELECT resource_type || '/' || resource_id FROM resource_heads")
            .await,
    );
    let imported_before_kill = stored.intersection(&imported_keys).count();
    assert!(
        imported_before_kill < imported_keys.len(),
        "the import was complete"
    );

    // Restarted on the same database: every acknowledged write is there and reads back.
    server.run().await;
    let client = server.client(&data.0);
    let stored_observations: BTreeSet<String> = keys_in(
        db.strings("SELECT resource_id FROM resource_heads WHERE resource_type = 'Observation'")
            .await,
    );
    let stored_http = stored_observations.len();
    let mut reads = Vec::new();
    for ids in acknowledged.chunks(acknowledged.len().div_ceil(4)) {
        let client = client.clone();
        let urls: Vec<String> = ids
            .iter()
            .map(|id| format!("{}/Observation/{id}", server.base_url))
            .collect();
        reads.push(tokio::spawn(async move {
            let mut present = 0;
            for url in urls {
                let read = client.get(&url).send().await.expect("a read");
                assert_eq!(read.status(), 200, "acknowledged {url} is lost");
                present += 1;
            }
            present
        }));
    }
    let mut present = 0;
    for read in reads {
        present += read.await.expect("reads");
    }
    assert!(acknowledged
        .iter()
        .all(|id| stored_observations.contains(id)));
    // Whatever the killed import committed is whole: each resource with its index rows and
    // its audit record (chunks are single transactions).
    let unaudited = db
        .count(
            "SELECT COUNT(*) FROM resource_versions v WHERE NOT EXISTS (SELECT 1 FROM audit_records a \
             WHERE a.resource_type = v.resource_type AND a.resource_id = v.resource_id \
               AND a.outcome BETWEEN 200 AND 299)",
        )
        .await;
    assert_eq!(unaudited, 0, "stored versions without their audit record");
    let unindexed = db
        .count(
            "SELECT COUNT(*) FROM resource_heads h WHERE NOT EXISTS (SELECT 1 FROM search_terms t \
             WHERE t.resource_type = h.resource_type AND t.resource_id = h.resource_id)",
        )
        .await;
    assert_eq!(unindexed, 0, "stored resources without index rows");
    // The records committed by the killed processes are placed in the one log, which verifies.
    db.wait_until_sequenced().await;
    audit_verifies(&config);

    // A re-run of the import completes and writes only what is missing.
    let (ok, stdout, stderr) = custodian_cli(
        &config,
        &["import", "--quiet", &dataset.display().to_string()],
    );
    assert!(ok, "the re-run of the import failed: {stdout}{stderr}");
    let run = crate::import::Run {
        success: ok,
        stdout,
        stderr,
    };
    let [created, updated, unchanged, import_failed] = crate::import::totals(&run);
    assert_eq!(
        (updated, import_failed),
        (0, 0),
        "the re-run: {}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        unchanged as usize, imported_before_kill,
        "what the killed run committed is left as it is"
    );
    assert_eq!(created as usize + imported_before_kill, imported_keys.len());
    let stored = keys_in(
        db.strings("SELECT resource_type || '/' || resource_id FROM resource_heads")
            .await,
    );
    assert!(imported_keys.is_subset(&stored), "the data set is complete");
    assert_eq!(
        db.count("SELECT COUNT(*) FROM resource_versions WHERE version_id > 1")
            .await,
        0,
        "nothing was written twice"
    );
    db.wait_until_sequenced().await;
    audit_verifies(&config);

    // (b) A Bulk Data export, the server killed while the job runs.
    let status_url = {
        let response = client
            .get(format!("{}/$export", server.base_url))
            .header("prefer", "respond-async")
            .header("accept", "application/fhir+json")
            .send()
            .await
            .expect("kick-off");
        assert_eq!(response.status(), 202);
        response.headers()["content-location"]
            .to_str()
            .expect("Content-Location")
            .to_string()
    };
    let deadline = Deadline::after(Duration::from_secs(30), "the export job to be running");
    while db
        .count(
            "SELECT COUNT(*) FROM export_jobs j WHERE status = 'running' \
             AND (SELECT COUNT(*) FROM export_chunks c WHERE c.job_id = j.job_id) >= 3",
        )
        .await
        == 0
    {
        deadline.tick().await;
    }
    server.kill();
    let chunks_at_kill = db.count("SELECT COUNT(*) FROM export_chunks").await;
    assert_eq!(
        db.strings("SELECT status FROM export_jobs").await,
        vec!["running".to_string()],
        "the job was killed while it ran"
    );

    server.run().await;
    let client = server.client(&data.0);
    let deadline = Deadline::after(
        Duration::from_secs(40),
        "the export to end after the restart",
    );
    let (final_status, outcome) = loop {
        let response = client.get(&status_url).send().await.expect("a status poll");
        let status = response.status().as_u16();
        if status != 202 {
            break (
                status,
                response.json::<Value>().await.expect("a JSON answer"),
            );
        }
        deadline.tick().await;
    };
    let attempts = db.count("SELECT attempts FROM export_jobs").await;
    let exported_lines = match final_status {
        200 => {
            // Resumed (restarted from scratch): everything once, nothing of the killed run twice.
            let mut lines = Vec::new();
            for output in outcome["output"].as_array().expect("the manifest's output") {
                let text = client
                    .get(output["url"].as_str().expect("a file URL"))
                    .send()
                    .await
                    .expect("a download")
                    .text()
                    .await
                    .expect("NDJSON");
                for line in text.lines().filter(|line| !line.is_empty()) {
                    let resource: Value = serde_json::from_str(line).expect("a resource line");
                    lines.push(format!(
                        "{}/{}",
                        resource["resourceType"].as_str().unwrap(),
                        resource["id"].as_str().unwrap()
                    ));
                }
            }
            let distinct: BTreeSet<String> = lines.iter().cloned().collect();
            assert_eq!(distinct.len(), lines.len(), "a resource exported twice");
            let current = keys_in(
                db.strings(
                    "SELECT resource_type || '/' || resource_id FROM resource_heads WHERE deleted = 0",
                )
                .await,
            );
            assert_eq!(distinct, current, "the export is the whole database");
            lines.len()
        }
        // Failed cleanly: a final state with an OperationOutcome.
        500 => {
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
            0
        }
        other => panic!("the export ended with {other}: {outcome}"),
    };
    db.wait_until_sequenced().await;
    audit_verifies(&config);

    eprintln!(
        "fault-figures: sigkill-import http_sent={sent} http_acknowledged={} \
         http_present_after_restart={present} http_stored={stored_http} \
         import_resources={} imported_before_kill={imported_before_kill} \
         rerun_created={created} rerun_unchanged={unchanged} rerun_updated={updated} \
         rerun_failed={import_failed} written_twice=0 audit_verify=ok",
        acknowledged.len(),
        imported_keys.len(),
    );
    eprintln!(
        "fault-figures: sigkill-export chunks_at_kill={chunks_at_kill} final_status={final_status} \
         ({}) attempts={attempts} exported_lines={exported_lines} audit_verify=ok",
        if final_status == 200 {
            "resumed, completed"
        } else {
            "failed cleanly"
        }
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Two server processes racing on If-Match.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_race_on_if_match() {
    const RESOURCES: usize = 4;
    const ROUNDS: usize = 5;
    /// Updates racing with the same If-Match, half through each node.
    const CONTENDERS: usize = 6;
    let Some(database_url) = postgres_test_database().await else {
        return;
    };
    // One data directory: the nodes share the checkpoint signing key, the query-hash key and
    // the local key-encryption key, as every node of one database must.
    let data = TempDir::new("faults-nodes");
    let ports = [free_port(), free_port()];
    // The first node migrates the database and creates the keys; then the second starts.
    let first = ServerProcess::start(
        write_config(&data.0, "node-a", ports[0], &database_url),
        ports[0],
    )
    .await;
    let second = ServerProcess::start(
        write_config(&data.0, "node-b", ports[1], &database_url),
        ports[1],
    )
    .await;
    let nodes = [&first, &second];
    let clients = [first.client(&data.0), second.client(&data.0)];
    let mut db = Db::connect(&database_url).await;

    let mut ids = Vec::new();
    for index in 0..RESOURCES {
        let response = clients[index % 2]
            .post(format!("{}/Patient", nodes[index % 2].base_url))
            .header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Patient", "active": true}).to_string())
            .send()
            .await
            .expect("a create");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("the Patient");
        ids.push(body["id"].as_str().expect("an id").to_string());
    }

    // Background load on both nodes while the races run.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = spawn_writers(&clients[0], &first.base_url, 1, "load", POLL, &stop);
    load.extend(spawn_writers(
        &clients[1],
        &second.base_url,
        1,
        "load",
        POLL,
        &stop,
    ));

    // winners[resource][round] = the marker of the update that won.
    let mut winners: Vec<Vec<String>> = vec![Vec::new(); RESOURCES];
    let mut won = 0;
    let mut refused = 0;
    for round in 0..ROUNDS {
        let version = round + 1;
        let barrier = Arc::new(tokio::sync::Barrier::new(RESOURCES * CONTENDERS));
        let mut racing = Vec::new();
        for (resource, id) in ids.iter().enumerate() {
            for contender in 0..CONTENDERS {
                let node = contender % 2;
                let client = clients[node].clone();
                let url = format!("{}/Patient/{id}", nodes[node].base_url);
                let marker = format!("r{round}c{contender}n{node}");
                let body = json!({"resourceType": "Patient", "id": id, "active": true,
                                  "name": [{"family": "Race", "given": [marker]}]});
                let barrier = barrier.clone();
                racing.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let response = client
                        .put(&url)
                        .header("content-type", FHIR_JSON)
                        .header("if-match", format!("W/\"{version}\""))
                        .body(body.to_string())
                        .send()
                        .await
                        .expect("an update");
                    let status = response.status().as_u16();
                    let answer: Value = response.json().await.unwrap_or(Value::Null);
                    (resource, marker, status, answer)
                }));
            }
        }
        let mut statuses: BTreeMap<usize, Vec<(String, u16)>> = BTreeMap::new();
        for race in racing {
            let (resource, marker, status, answer) = race.await.expect("a racing update");
            match status {
                200 => {
                    assert_eq!(answer["meta"]["versionId"], (version + 1).to_string());
                    won += 1;
                }
                412 => {
                    assert!(is_outcome(&answer, "conflict"), "{answer}");
                    refused += 1;
                }
                other => panic!("a racing update answered {other}: {answer}"),
            }
            statuses.entry(resource).or_default().push((marker, status));
        }
        for (resource, outcomes) in statuses {
            let winners_here: Vec<&String> = outcomes
                .iter()
                .filter(|(_, status)| *status == 200)
                .map(|(marker, _)| marker)
                .collect();
            assert_eq!(
                winners_here.len(),
                1,
                "round {round}, resource {resource}: exactly one update wins: {outcomes:?}"
            );
            winners[resource].push(winners_here[0].clone());
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut load_sent = 0;
    let mut load_acknowledged = 0;
    for writer in load {
        let (sent, acknowledged) = writer.await.expect("a load writer");
        load_sent += sent;
        load_acknowledged += acknowledged.len();
    }
    assert_eq!(
        load_sent, load_acknowledged,
        "background writes all succeed"
    );

    // No lost update: each resource has one version per win, each the winner's content, read
    // through the other node.
    let mut lost_updates = 0;
    for (resource, id) in ids.iter().enumerate() {
        let versions = db
            .count(&format!(
                "SELECT COUNT(*) FROM resource_versions WHERE resource_type = 'Patient' AND resource_id = '{id}'"
            ))
            .await;
        assert_eq!(
            versions,
            ROUNDS as i64 + 1,
            "Patient/{id}: wins + 1 versions"
        );
        for (round, marker) in winners[resource].iter().enumerate() {
            let version = round + 2;
            let node = 1 - marker.ends_with("n1") as usize;
            let read: Value = clients[node]
                .get(format!(
                    "{}/Patient/{id}/_history/{version}",
                    nodes[node].base_url
                ))
                .send()
                .await
                .expect("a vread")
                .json()
                .await
                .expect("the version");
            if read["name"][0]["given"][0] != marker.as_str() {
                lost_updates += 1;
            }
        }
    }
    assert_eq!(
        lost_updates, 0,
        "an acknowledged update is not the stored version"
    );

    // One audit tree: every request of both nodes once, densely sequenced, verifying.
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'update' AND outcome = 200"
        )
        .await,
        won as i64
    );
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM audit_records WHERE interaction = 'update' AND outcome = 412"
        )
        .await,
        refused as i64
    );
    db.wait_until_sequenced().await;
    let records = db.count("SELECT COUNT(*) FROM audit_records").await;
    let log_size = db.count("SELECT COUNT(*) FROM audit_log").await;
    let next_sequence = db
        .count("SELECT COALESCE(MAX(sequence) + 1, 0) FROM audit_log")
        .await;
    assert_eq!(
        (log_size, next_sequence),
        (records, records),
        "one dense sequence over both nodes' records"
    );
    audit_verifies(&first.config);

    eprintln!(
        "fault-figures: two-nodes races={} contenders_each={CONTENDERS} updates_sent={} won={won} \
         refused_412={refused} lost_updates={lost_updates} background_sent={load_sent} \
         background_acknowledged={load_acknowledged} audit_records={records} log_size={log_size} \
         audit_verify=ok",
        RESOURCES * ROUNDS,
        RESOURCES * ROUNDS * CONTENDERS,
    );
}
