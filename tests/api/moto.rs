//! The KMS emulator, and [`AwsKmsProvider`] tested against it over HTTP.
//!
//! [`MotoServer`] runs PyPI `moto[server]` (`moto_server`), an in-memory emulator of the AWS
//! APIs, on a free local port. scripts/test installs it into `.tools/kms-venv` and sets
//! `CUSTODIAN_TEST_MOTO_SERVER` to its `moto_server`, with test credentials and the region in
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` (the provider under test takes
//! its credentials from the AWS chain like in production, and must find them there, not in the
//! developer's own AWS config). Without `CUSTODIAN_TEST_MOTO_SERVER` the tests are skipped
//! loudly, and with CI=true that is a failure.
//!
//! What moto's KMS does, checked here against moto 5.2.5 (see the tests below):
//! - It enforces the encryption context on `Decrypt` (it is the AES-GCM additional data of its
//!   ciphertexts): another context, or none, is `InvalidCiphertextException`, like AWS.
//! - A flipped byte in the sealed part of a ciphertext is `InvalidCiphertextException`, like AWS.
//! - It never answers `IncorrectKeyException`: a ciphertext decrypted with `KeyId` naming another
//!   key, and a ciphertext whose embedded key id is damaged (moto's ciphertexts start with the
//!   key's id in clear, AWS's do not), are both `AccessDeniedException`, which the provider maps
//!   to `Internal`. On AWS the first is `IncorrectKeyException` and the second
//!   `InvalidCiphertextException`, both `Integrity`; only that mapping itself is not proven here.
//! - It keeps everything in memory: after a restart every key is gone.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use custodian::crypto::aws::AwsKmsProvider;
use custodian::crypto::{CryptoError, DataKey, KeyContext, KeyProvider, WrappedKey};

/// The region the emulator's keys live in (scripts/test sets the same in `AWS_REGION`).
const REGION: &str = "us-east-1";

/// How long the emulator may take to answer after it is started (a cold Python start is slow).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `moto_server`, stopped when dropped.
pub struct MotoServer {
    executable: PathBuf,
    port: u16,
    /// `None` while stopped.
    process: Option<Child>,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` from the executable named by env CUSTODIAN_TEST_MOTO_SERVER;
    /// None (with a loud "*** SKIPPING ... ***" eprintln) when that env var is unset — but panic when CI=true.
    pub async fn start() -> Option<MotoServer> {
        let executable = moto_server_executable()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let mut server = MotoServer {
            executable,
            port,
            process: None,
        };
        server.restart().await;
        Some(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a symmetric encryption key (CreateKey) and returns its KeyId (a bare UUID).
    pub async fn create_key(&self) -> String {
        self.client()
            .create_key()
            .send()
            .await
            .expect("CreateKey")
            .key_metadata
            .expect("CreateKey answers KeyMetadata")
            .key_id
    }

    /// Creates a key and points `alias` (`alias/...`) at it; returns the new key's KeyId.
    pub async fn create_key_with_alias(&self, alias: &str) -> String {
        let key_id = self.create_key().await;
        self.client()
            .create_alias()
            .alias_name(alias)
            .target_key_id(&key_id)
            .send()
            .await
            .expect("CreateAlias");
        key_id
    }

    /// Kills the emulator and waits for it to exit: a KMS outage. Does nothing when stopped.
    /// Freezes the emulator (SIGSTOP): connections are accepted by the kernel but never answered,
    /// like a KMS that hangs. Its state survives, unlike [`MotoServer::stop`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused emulator (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(process) = &self.process {
            let status = Command::new("kill")
                .arg(signal)
                .arg(process.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the emulator again on the same port and waits until it answers. Moto keeps its
    /// state in memory only, so the restarted emulator has no keys and no aliases: create them
    /// again.
    pub async fn restart(&mut self) {
        self.stop();
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the moto_server log");
        let process = Command::new(&self.executable)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share the moto_server log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", self.executable.display()));
        self.process = Some(process);
        self.wait_until_ready().await;
    }

    /// Polls `GET /` until the emulator answers anything over HTTP.
    async fn wait_until_ready(&mut self) {
        custodian::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if http.get(self.endpoint_url()).send().await.is_ok() {
                return;
            }
            let process = self.process.as_mut().expect("moto_server was started");
            if let Ok(Some(status)) = process.try_wait() {
                panic!(
                    "moto_server exited ({status}) before it answered; see {}",
                    self.log_path().display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {} within {READY_TIMEOUT:?}; see {}",
                self.port,
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the emulator's output goes (one file per port, appended across restarts).
    fn log_path(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("moto-server-{}.log", self.port))
    }

    /// The harness' own KMS client, with static test credentials: it must not depend on the
    /// environment or on the developer's AWS config.
    fn client(&self) -> aws_sdk_kms::Client {
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint_url())
            .credentials_provider(Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "custodian-moto-harness",
            ))
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `moto_server` to run, once the environment is fit for the KMS tests; `None` (skipped,
/// loudly) when scripts/test did not set them up, which is a failure with CI=true.
fn moto_server_executable() -> Option<PathBuf> {
    let Ok(executable) = std::env::var("CUSTODIAN_TEST_MOTO_SERVER") else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CUSTODIAN_TEST_MOTO_SERVER is not set and CI=true: run the suite with scripts/test");
        }
        eprintln!("\n*** SKIPPING the AWS KMS provider tests: CUSTODIAN_TEST_MOTO_SERVER is not set (scripts/test sets it) ***\n");
        return None;
    };
    // Without these the provider's credential chain would go on to the developer's own AWS
    // profile or to the instance metadata service: never what a test should talk to.
    for variable in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            std::env::var_os(variable).is_some(),
            "{variable} is not set: the KMS tests need test credentials in the environment \
             (scripts/test sets AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing)"
        );
    }
    Some(PathBuf::from(executable))
}

/// The provider under test, against the emulator, with the given per-call timeout.
async fn provider(moto: &MotoServer, key_id: &str, timeout: Duration) -> AwsKmsProvider {
    AwsKmsProvider::new(
        key_id.to_string(),
        Some(REGION.to_string()),
        Some(moto.endpoint_url()),
        timeout,
    )
    .await
}

/// A data key's context: `compartment` is a compartment pseudonym, `None` the tenant's key.
fn context(compartment: Option<&str>) -> KeyContext {
    KeyContext {
        tenant: "default".into(),
        key_id: uuid::Uuid::new_v4().to_string(),
        compartment: compartment.map(str::to_string),
    }
}

/// A data key that is not all zeros (two random UUIDs).
fn some_data_key() -> DataKey {
    let mut key = DataKey::new([0; 32]);
    key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    key
}

/// `wrapped` with the byte at `index` flipped.
fn with_flipped_byte(wrapped: &WrappedKey, index: usize) -> WrappedKey {
    let mut damaged = wrapped.clone();
    damaged.ciphertext[index] ^= 0x01;
    damaged
}

#[tokio::test]
async fn a_generated_data_key_unwraps_to_the_same_bytes() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let key_id = moto.create_key().await;
    let kms = provider(&moto, &key_id, Duration::from_secs(5)).await;
    assert_eq!(kms.name(), "aws");
    assert_eq!(kms.current_kek_id(), key_id);

    let context = context(Some("compartment-a"));
    let (key, wrapped) = kms.generate_data_key(&context).await.unwrap();
    assert_ne!(*key, [0; 32]);
    // KMS answers the key's ARN, and that is what the wrapped key records.
    assert!(
        wrapped.kek_id.starts_with("arn:aws:kms:") && wrapped.kek_id.ends_with(&key_id),
        "kek_id {}",
        wrapped.kek_id
    );
    assert!(!wrapped
        .ciphertext
        .windows(32)
        .any(|window| window == &key[..]));

    let unwrapped = kms.unwrap_data_key(&wrapped, &context).await.unwrap();
    assert_eq!(*unwrapped, *key);

    // Another generated key is another key.
    let (other, _) = kms.generate_data_key(&context).await.unwrap();
    assert_ne!(*other, *key);
}

#[tokio::test]
async fn an_existing_data_key_wraps_and_unwraps_back() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let key_id = moto.create_key().await;
    let kms = provider(&moto, &key_id, Duration::from_secs(5)).await;
    let key = some_data_key();
    let tenant_context = context(None);

    let wrapped = kms.wrap_data_key(&key, &tenant_context).await.unwrap();
    assert!(
        wrapped.kek_id.ends_with(&key_id),
        "kek_id {}",
        wrapped.kek_id
    );
    let unwrapped = kms
        .unwrap_data_key(&wrapped, &tenant_context)
        .await
        .unwrap();
    assert_eq!(*unwrapped, *key);
}

#[tokio::test]
async fn a_wrapped_key_does_not_unwrap_under_another_context() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let key_id = moto.create_key().await;
    let kms = provider(&moto, &key_id, Duration::from_secs(5)).await;
    let context = context(Some("compartment-a"));
    let (_, wrapped) = kms.generate_data_key(&context).await.unwrap();

    // Moto enforces the encryption context (InvalidCiphertextException), as AWS does.
    let other_compartment = KeyContext {
        compartment: Some("compartment-b".into()),
        ..context.clone()
    };
    let tenant_key = KeyContext {
        compartment: None,
        ..context.clone()
    };
    let other_tenant = KeyContext {
        tenant: "other-tenant".into(),
        ..context.clone()
    };
    let other_key_row = KeyContext {
        key_id: uuid::Uuid::new_v4().to_string(),
        ..context.clone()
    };
    for wrong in [other_compartment, tenant_key, other_tenant, other_key_row] {
        let result = kms.unwrap_data_key(&wrapped, &wrong).await;
        assert!(
            matches!(result, Err(CryptoError::Integrity(_))),
            "unwrap under {wrong:?}: {result:?}"
        );
    }
    // The right context still works.
    kms.unwrap_data_key(&wrapped, &context).await.unwrap();
}

#[tokio::test]
async fn a_damaged_wrapped_key_is_an_integrity_failure() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let key_id = moto.create_key().await;
    let kms = provider(&moto, &key_id, Duration::from_secs(5)).await;
    let context = context(Some("compartment-a"));
    let (_, wrapped) = kms.generate_data_key(&context).await.unwrap();

    // Past moto's key-id prefix (36 bytes, see the next test): nonce, ciphertext and tag.
    let last = wrapped.ciphertext.len() - 1;
    for index in [40, last / 2 + 20, last] {
        let result = kms
            .unwrap_data_key(&with_flipped_byte(&wrapped, index), &context)
            .await;
        assert!(
            matches!(result, Err(CryptoError::Integrity(_))),
            "byte {index} flipped: {result:?}"
        );
    }
    let mut truncated = wrapped.clone();
    truncated.ciphertext.truncate(last);
    let result = kms.unwrap_data_key(&truncated, &context).await;
    assert!(
        matches!(result, Err(CryptoError::Integrity(_))),
        "truncated: {result:?}"
    );
}

/// Where moto differs from AWS. AWS answers a ciphertext decrypted with another key's KeyId
/// with IncorrectKeyException, and a damaged ciphertext with InvalidCiphertextException: both
/// Integrity. Moto answers both of these with AccessDeniedException, which the provider maps to
/// Internal (on AWS that code means a key policy or IAM problem). This test pins what moto does,
/// so a moto upgrade that changes it shows here; the provider's mapping of
/// IncorrectKeyException to Integrity is not exercised by any emulator we have.
#[tokio::test]
async fn moto_answers_another_keys_ciphertext_with_access_denied() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    let key_id = moto.create_key().await;
    let other_key_id = moto.create_key().await;
    let kms = provider(&moto, &key_id, Duration::from_secs(5)).await;
    let other_kms = provider(&moto, &other_key_id, Duration::from_secs(5)).await;
    let context = context(Some("compartment-a"));
    let (_, wrapped) = kms.generate_data_key(&context).await.unwrap();
    let (_, other_wrapped) = other_kms.generate_data_key(&context).await.unwrap();

    // This key's ciphertext, presented as the other key's.
    let misattributed = WrappedKey {
        kek_id: other_wrapped.kek_id.clone(),
        ..wrapped.clone()
    };
    let result = kms.unwrap_data_key(&misattributed, &context).await;
    assert!(
        matches!(&result, Err(CryptoError::Internal(message)) if message.contains("AccessDeniedException")),
        "another key's id: {result:?}"
    );

    // Moto's ciphertexts start with the key's UUID in clear; damaging it names no known key.
    assert!(wrapped.ciphertext.starts_with(key_id.as_bytes()));
    let result = kms
        .unwrap_data_key(&with_flipped_byte(&wrapped, 0), &context)
        .await;
    assert!(
        matches!(&result, Err(CryptoError::Internal(message)) if message.contains("AccessDeniedException")),
        "damaged key id: {result:?}"
    );
}

#[tokio::test]
async fn a_kms_outage_fails_fast_and_the_same_provider_recovers() {
    let Some(mut moto) = MotoServer::start().await else {
        return;
    };
    // Through an alias, so the provider keeps working once the alias is re-created after the
    // restart (moto forgets every key, and a new key gets a new id).
    let alias = "alias/custodian-test";
    moto.create_key_with_alias(alias).await;
    let timeout = Duration::from_secs(1);
    let kms = provider(&moto, alias, timeout).await;
    let context = context(Some("compartment-a"));
    let (key, wrapped) = kms.generate_data_key(&context).await.unwrap();

    moto.stop();
    let started = Instant::now();
    let generated = kms.generate_data_key(&context).await;
    let generate_took = started.elapsed();
    assert!(
        matches!(generated, Err(CryptoError::Unavailable(_))),
        "generate during the outage: {generated:?}"
    );
    let started = Instant::now();
    let unwrapped = kms.unwrap_data_key(&wrapped, &context).await;
    let unwrap_took = started.elapsed();
    assert!(
        matches!(unwrapped, Err(CryptoError::Unavailable(_))),
        "unwrap during the outage: {unwrapped:?}"
    );
    let started = Instant::now();
    let rewrapped = kms.wrap_data_key(&key, &context).await;
    let wrap_took = started.elapsed();
    assert!(
        matches!(rewrapped, Err(CryptoError::Unavailable(_))),
        "wrap during the outage: {rewrapped:?}"
    );
    eprintln!(
        "KMS down, timeout {timeout:?}: generate failed after {generate_took:?}, unwrap after \
         {unwrap_took:?}, wrap after {wrap_took:?}"
    );
    for took in [generate_took, unwrap_took, wrap_took] {
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    moto.restart().await;
    let new_key_id = moto.create_key_with_alias(alias).await;
    let (key, wrapped) = kms.generate_data_key(&context).await.unwrap();
    assert!(
        wrapped.kek_id.ends_with(&new_key_id),
        "kek_id {}",
        wrapped.kek_id
    );
    let unwrapped = kms.unwrap_data_key(&wrapped, &context).await.unwrap();
    assert_eq!(*unwrapped, *key);
}

#[tokio::test]
async fn a_kms_that_never_answers_times_out() {
    // Only the test environment is needed (credentials), not the emulator: a listener that
    // accepts connections and never answers stands for a KMS that hangs.
    if moto_server_executable().is_none() {
        return;
    }
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint_url = format!("http://{}", silent.local_addr().unwrap());
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            held.push(connection);
        }
    });
    let timeout = Duration::from_secs(1);
    let kms = AwsKmsProvider::new(
        "alias/custodian-test".into(),
        Some(REGION.into()),
        Some(endpoint_url),
        timeout,
    )
    .await;

    let started = Instant::now();
    let result = kms.generate_data_key(&context(None)).await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(CryptoError::Unavailable(_))),
        "generate against a hung KMS: {result:?}"
    );
    assert!(
        took >= timeout && took < timeout * 3,
        "failed after {took:?}, timeout {timeout:?}"
    );
    accepting.abort();
}
