//! Test harness: starts the real server on port 0 against a fresh database (a SQLite file in a
//! temporary directory, or a new PostgreSQL database), and talks to it over HTTP.
//!
//! PostgreSQL: `CUSTODIAN_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432`). When
//! it is unreachable the PostgreSQL variant of each test is skipped with a loud message, except
//! when `CI=true`, where that is a failure.

use std::path::PathBuf;
use std::sync::OnceLock;

use custodian::authz::dev::{DevIssuer, DevTokenRequest};
use custodian::config::Settings;
use custodian::startup::Application;
use secrecy::SecretString;
use sqlx::Connection;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running server and what the test needs to reach it and its database.
pub struct TestApp {
    pub base_url: String,
    /// Sends the suite's default token (an EHR system with `system/*.cruds`).
    pub client: reqwest::Client,
    /// Sends no token.
    pub anonymous: reqwest::Client,
    /// The database URL, for tests that inspect rows directly.
    pub database_url: String,
    pub backend: Backend,
    data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if !self.data_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

pub fn postgres_server_url() -> String {
    std::env::var("CUSTODIAN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The repository root (where `fhir-profiles/` lives).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared third-party test data (`../shared/testdata`).
pub fn testdata_dir() -> PathBuf {
    std::env::var("CUSTODIAN_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_dir().join("../shared/testdata"))
}

async fn postgres_reachable() -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    if let Some(known) = REACHABLE.get() {
        return *known;
    }
    let url = format!("{}/postgres", postgres_server_url());
    let connection = sqlx::PgConnection::connect(&url).await;
    let reachable = connection.is_ok();
    if let Ok(mut admin) = connection {
        drop_leftover_databases(&mut admin).await;
    }
    if !reachable {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("PostgreSQL at {url} is unreachable and CI=true: PostgreSQL tests may not be skipped");
        }
        eprintln!(
            "\n*** SKIPPING PostgreSQL tests: no server at {url} (start it, or set CUSTODIAN_TEST_POSTGRES_URL) ***\n"
        );
    }
    *REACHABLE.get_or_init(|| reachable)
}

/// Drops the databases earlier runs of the suite left behind (each test creates its own), so
/// that the shared PostgreSQL server does not fill up. Databases still in use are skipped.
async fn drop_leftover_databases(admin: &mut sqlx::PgConnection) {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'custodian\\_test\\_%' OR datname LIKE 'custodian\\_logs\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    .unwrap_or_default();
    for row in rows {
        let name: String = row.get(0);
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut *admin)
            .await;
    }
}

/// A new, empty PostgreSQL database for one test; its URL. `None` when PostgreSQL is
/// unreachable and skipping is allowed (see the module docs).
pub async fn postgres_test_database() -> Option<String> {
    if !postgres_reachable().await {
        return None;
    }
    let name = format!("custodian_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_server_url()))
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    Some(format!("{}/{name}", postgres_server_url()))
}

/// Settings for a test server with a fresh data directory.
pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        profiles_dir: repo_dir().join("fhir-profiles"),
        max_connections: 8,
        ..Settings::default()
    };
    // The suite signs its tokens with the development issuer, on SQLite and PostgreSQL alike.
    settings.auth.dev_issuer = custodian::config::DevIssuerMode::On;
    settings.auth.policies_dir = repo_dir().join("policies");
    settings.audit.catalog_dir = repo_dir().join("audit");
    // Tests fire requests as fast as the machine allows; the budgets have their own tests.
    settings.rate_limit.client_per_sec = 0.0;
    settings.rate_limit.unauthenticated_per_sec = 0.0;
    settings
}

/// A token of the development issuer for `base_url`, with the given role, scopes and claims.
pub fn dev_token(data_dir: &std::path::Path, base_url: &str, request: DevTokenRequest) -> String {
    DevIssuer::load_or_create(data_dir)
        .expect("dev issuer key")
        .mint(base_url, &request)
        .expect("mint a token")
}

/// The suite's default caller: an EHR system with every `system/` permission.
pub fn ehr_system() -> DevTokenRequest {
    DevTokenRequest {
        subject: "test-ehr".into(),
        roles: vec!["ehr-system".into()],
        scope: "system/*.cruds".into(),
        lifetime_secs: 3600,
        ..DevTokenRequest::default()
    }
}

/// Starts a server on `backend` with optional changes to its settings; `None` when the backend
/// is unavailable and skipping is allowed.
pub async fn spawn_app_with(
    backend: Backend,
    adjust: impl FnOnce(&mut Settings),
) -> Option<TestApp> {
    let data_dir = std::env::temp_dir().join(format!("custodian-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).expect("temp dir");
    let mut settings = test_settings(&data_dir);
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}/custodian.db?mode=rwc", data_dir.display()),
        Backend::Postgres => postgres_test_database().await?,
    };
    settings.database_url = Some(SecretString::from(database_url.clone()));
    adjust(&mut settings);
    Some(start(settings, backend, data_dir, database_url).await)
}

async fn start(
    settings: Settings,
    backend: Backend,
    data_dir: PathBuf,
    database_url: String,
) -> TestApp {
    let application = Application::build(settings).await.expect("server builds");
    let port = application.port();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let (finished, done) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = application
            .run_until(async {
                let _ = stopped.await;
            })
            .await;
        let _ = finished.send(());
    });
    custodian::install_crypto_provider();
    let base_url = format!("http://127.0.0.1:{port}");
    let token = dev_token(&data_dir, &base_url, ehr_system());
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    TestApp {
        base_url,
        client: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client"),
        anonymous: reqwest::Client::new(),
        database_url,
        backend,
        data_dir,
        shutdown: Some(shutdown),
        stopped: Some(done),
    }
}

impl TestApp {
    /// Stops the server and starts a new one on the same data directory and database (a
    /// restart: nothing in memory survives, e.g. cached data keys and loaded KEKs).
    pub async fn restart(mut self, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.await;
        }
        let mut settings = test_settings(&self.data_dir);
        settings.database_url = Some(SecretString::from(self.database_url.clone()));
        adjust(&mut settings);
        let data_dir = std::mem::take(&mut self.data_dir);
        start(settings, self.backend, data_dir, self.database_url.clone()).await
    }

    /// Makes `client` send this token instead of the default one.
    pub fn use_token(&mut self, token: &str) {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        self.client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client");
    }

    /// A token for this server from the development issuer.
    pub fn token(&self, request: DevTokenRequest) -> String {
        dev_token(&self.data_dir, &self.base_url, request)
    }

    /// The data directory (SQLite file, local key files).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }
}

/// Starts a server with default test settings.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

pub const FHIR_JSON: &str = "application/fhir+json";
pub const FHIR_XML: &str = "application/fhir+xml";

impl TestApp {
    /// `{base}/{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url, path.trim_start_matches('/'))
    }

    /// POSTs a JSON resource to `/{type}`.
    pub async fn create(&self, resource: &serde_json::Value) -> reqwest::Response {
        let resource_type = resource["resourceType"].as_str().expect("resourceType");
        self.client
            .post(self.url(resource_type))
            .header("content-type", FHIR_JSON)
            .body(resource.to_string())
            .send()
            .await
            .expect("request")
    }

    /// Creates a resource and returns its server-assigned id.
    pub async fn create_id(&self, resource: &serde_json::Value) -> String {
        let response = self.create(resource).await;
        assert_eq!(
            response.status(),
            201,
            "create failed: {}",
            response.text().await.unwrap_or_default()
        );
        let body: serde_json::Value = response.json().await.expect("json");
        body["id"].as_str().expect("id").to_string()
    }

    /// PUTs a JSON resource to `path`.
    pub async fn put(&self, path: &str, resource: &serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("content-type", FHIR_JSON)
            .body(resource.to_string())
            .send()
            .await
            .expect("request")
    }

    /// GETs `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// GETs `path` and parses the JSON body, asserting the status.
    pub async fn get_json(&self, path: &str, status: u16) -> serde_json::Value {
        let response = self.get(path).await;
        assert_eq!(response.status().as_u16(), status, "GET {path}");
        response.json().await.expect("json body")
    }

    /// DELETEs `path`.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// A direct connection to the test database. On SQLite it first waits until the server has
    /// copied reads' audit records from its read-audit journal into `audit_records` (its
    /// sequencer does so every 100 ms), so that a test sees the records of the requests it made.
    async fn connect(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        if let Some(journal) = read_audit_journal_path(&self.database_url) {
            settle_read_audit_journal(&journal, &self.database_url).await;
        }
        sqlx::AnyConnection::connect(&self.database_url)
            .await
            .expect("connect to the test database")
    }

    /// Runs one SQL query returning a single integer (tests that inspect the database).
    pub async fn count(&self, sql: &str) -> i64 {
        use sqlx::Row;
        let mut connection = self.connect().await;
        let row = sqlx::query(sql)
            .fetch_one(&mut connection)
            .await
            .expect("query");
        row.try_get::<i64, _>(0).expect("integer")
    }

    /// The database's plan of `sql`, one line per row (`EXPLAIN` on PostgreSQL, `EXPLAIN
    /// QUERY PLAN` on SQLite, whose detail is the last column).
    pub async fn plan_of(&self, sql: &str) -> Vec<String> {
        use sqlx::Row;
        let explain = match self.backend {
            Backend::Sqlite => "EXPLAIN QUERY PLAN",
            Backend::Postgres => "EXPLAIN",
        };
        let mut connection = self.connect().await;
        sqlx::query(&format!("{explain} {sql}"))
            .fetch_all(&mut connection)
            .await
            .expect("explain")
            .iter()
            .map(|row| row.try_get::<String, _>(row.len() - 1).expect("plan text"))
            .collect()
    }

    /// Runs one SQL statement directly on the database (tests that tamper with rows).
    pub async fn execute(&self, sql: &str) {
        let mut connection = self.connect().await;
        sqlx::query(sql)
            .execute(&mut connection)
            .await
            .expect("statement");
    }

    /// Runs several SQL statements on one connection (e.g. a session setting, then a change).
    pub async fn execute_script(&self, sql: &str) {
        let mut connection = self.connect().await;
        sqlx::raw_sql(sql)
            .execute(&mut connection)
            .await
            .expect("script");
    }

    /// Runs one SQL statement and returns its error, if any.
    pub async fn try_execute(&self, sql: &str) -> Result<(), String> {
        let mut connection = self.connect().await;
        sqlx::raw_sql(sql)
            .execute(&mut connection)
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    /// A second server on the same database and data directory (another node).
    pub async fn second_node(&self) -> TestApp {
        let mut settings = test_settings(&self.data_dir);
        settings.database_url = Some(SecretString::from(self.database_url.clone()));
        let mut node = start(
            settings,
            self.backend,
            self.data_dir.clone(),
            self.database_url.clone(),
        )
        .await;
        // The first node owns the directory.
        node.data_dir = PathBuf::new();
        node
    }

    /// Another server process on the same data directory (keys, erasure ledger) but another
    /// database: a restored backup opened by a fresh server.
    pub async fn node_on(&self, database_url: &str) -> TestApp {
        self.node_with(database_url, |_| {}).await
    }

    /// As [`TestApp::node_on`], with changes to the node's settings.
    pub async fn node_with(
        &self,
        database_url: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> TestApp {
        let mut settings = test_settings(&self.data_dir);
        settings.database_url = Some(SecretString::from(database_url.to_string()));
        adjust(&mut settings);
        let mut node = start(
            settings,
            self.backend,
            self.data_dir.clone(),
            database_url.to_string(),
        )
        .await;
        // The first node owns the directory.
        node.data_dir = PathBuf::new();
        node
    }

    /// Runs one SQL query returning text values of the first column.
    pub async fn strings(&self, sql: &str) -> Vec<Option<String>> {
        use sqlx::Row;
        let mut connection = self.connect().await;
        let rows = sqlx::query(sql)
            .fetch_all(&mut connection)
            .await
            .expect("query");
        rows.iter()
            .map(|row| row.try_get::<Option<String>, _>(0).expect("text"))
            .collect()
    }
}

/// Defines a test on both backends: `both_backends!(name, async_fn)` makes `name::sqlite` and
/// `name::postgres`, each calling `async_fn(app)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $test:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite)
                    .await
                    .expect("SQLite always runs");
                $test(app).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(app) =
                    $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await
                {
                    $test(app).await;
                }
            }
        }
    };
}

/// A resource without what the server sets (`id`, `meta.versionId`, `meta.lastUpdated`).
pub fn without_server_fields(mut resource: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let object = resource.as_object_mut().expect("a resource object");
    object.remove("id");
    if let Some(Value::Object(meta)) = object.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            object.remove("meta");
        }
    }
    resource
}

/// The read-audit journal beside a SQLite test database (`<database>-read-audit`, see
/// `ReadAuditJournal` in src/store/sql.rs); `None` on PostgreSQL.
pub fn read_audit_journal_path(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.strip_prefix("sqlite://")?;
    let path = rest.split('?').next().unwrap_or_default();
    Some(PathBuf::from(format!("{path}-read-audit")))
}

/// Waits (at most 10 s, then fails the test: the server copies every 100 ms) until the server
/// has copied every record of the read-audit journal at `journal` into the log's table of the
/// database at `database_url` (the journal keeps copied rows for a while; the main database's
/// `audit_journal_progress` says how far copying got).
async fn settle_read_audit_journal(journal: &std::path::Path, database_url: &str) {
    if !journal.exists() {
        return;
    }
    let url = format!("sqlite://{}?mode=ro", journal.display());
    let (Ok(mut journal), Ok(mut main)) = (
        sqlx::AnyConnection::connect(&url).await,
        sqlx::AnyConnection::connect(database_url).await,
    ) else {
        return;
    };
    let Ok(identity) =
        sqlx::query_scalar::<_, String>("SELECT identity FROM journal_identity WHERE id = 1")
            .fetch_one(&mut journal)
            .await
    else {
        return;
    };
    for _ in 0..1000 {
        let newest: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(journal_id), 0) FROM audit_journal")
                .fetch_one(&mut journal)
                .await
                .unwrap_or(0);
        let copied: i64 = sqlx::query_scalar(
            "SELECT COALESCE((SELECT copied_through FROM audit_journal_progress \
                              WHERE journal = $1), 0)",
        )
        .bind(&identity)
        .fetch_one(&mut main)
        .await
        .unwrap_or(0);
        if newest <= copied {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the read-audit journal was not copied into the log within 10 s");
}
