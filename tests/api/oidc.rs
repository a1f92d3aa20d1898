//! The OpenID provider the authentication tests get their tokens from, and tests that prove it.
//!
//! [`OidcProvider`] runs npm `oidc-provider` (panva; pinned in `tests/oidc/package.json`) through
//! `tests/oidc/provider.mjs` on a free loopback port: a real provider with discovery, a JWKS and
//! a token endpoint, issuing JWT access tokens (RFC 9068) for the audiences it is started with.
//! scripts/test installs its packages (`npm ci`) and sets `CUSTODIAN_TEST_OIDC_DIR` to the folder
//! that holds them (default `tests/oidc`). Without node or the packages the tests are skipped
//! loudly, and with CI=true that is a failure.
//!
//! Tokens to be had:
//! - [`OidcProvider::client_secret_token`]: client_credentials as client `ehr-secret`
//!   (client_secret_basic);
//! - [`OidcProvider::private_key_jwt_token`]: client_credentials as client `ehr-jwt`, whose
//!   client assertion is signed here with the key the provider generated and registered for it;
//! - [`OidcProvider::mint`]: a user's token with any claims, from the provider's test-only
//!   `POST /test/mint` (there is no browser login), issued by the provider's own AccessToken
//!   model, so signed like every other access token of it.
//!
//! Client tokens carry the client's claims ([`EHR_CLIENT_ROLES`], [`EHR_CLIENT_TENANT`],
//! [`EHR_CLIENT_PURPOSE_OF_USE`]); their scope is what was asked for, less anything that is not a
//! SMART scope or a SMART/OpenID context scope.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::repo_dir;

/// Client `ehr-secret`: client_credentials with client_secret_basic or client_secret_post.
pub const EHR_SECRET_CLIENT_ID: &str = "ehr-secret";
/// Its secret (tests/oidc/provider.mjs has the same).
pub const EHR_SECRET_CLIENT_SECRET: &str = "custodian-test-ehr-secret-not-for-production";
/// Client `ehr-jwt`: client_credentials with private_key_jwt.
pub const EHR_JWT_CLIENT_ID: &str = "ehr-jwt";
/// The `client_id` of tokens minted by [`OidcProvider::mint`].
pub const MINT_CLIENT_ID: &str = "test-user-client";
/// The `roles` claim of both EHR clients' tokens.
pub const EHR_CLIENT_ROLES: &[&str] = &["ehr-system"];
/// The `tenant` claim of both EHR clients' tokens.
pub const EHR_CLIENT_TENANT: &str = "default";
/// The `purpose_of_use` claim of both EHR clients' tokens.
pub const EHR_CLIENT_PURPOSE_OF_USE: &str = "TREAT";

/// How long node may take to start the provider (it generates its keys first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client assertion is valid: it is used at once.
const CLIENT_ASSERTION_LIFETIME_SECONDS: u64 = 60;

/// A running provider, stopped when dropped.
pub struct OidcProvider {
    issuer: String,
    token_endpoint: String,
    process: Child,
    /// Held open: the provider exits when its stdin closes, so it cannot outlive this process.
    _stdin: ChildStdin,
    /// Where the provider's log and the `ehr-jwt` key are; removed on drop unless a test failed.
    work_dir: PathBuf,
    client_key_path: PathBuf,
    client_key: EncodingKey,
    client_key_id: String,
    http: reqwest::Client,
}

impl OidcProvider {
    /// Starts `node tests/oidc/provider.mjs` (node_modules must exist in the folder named by env
    /// CUSTODIAN_TEST_OIDC_DIR, default tests/oidc) on a free port with the given audiences, the
    /// first being the default resource; None with a loud "*** SKIPPING ... ***" when node or
    /// node_modules are missing, but panic when CI=true.
    pub async fn start(audiences: &[&str]) -> Option<OidcProvider> {
        assert!(!audiences.is_empty(), "the provider needs an audience");
        let packages_dir = installed_packages_dir()?;
        let work_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("oidc-provider-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&work_dir).expect("create the provider's work directory");
        let client_key_path = work_dir.join("ehr-jwt-key.json");
        let log_path = work_dir.join("provider.log");
        let log = std::fs::File::create(&log_path).expect("create the provider log");

        let mut command = Command::new("node");
        command
            .arg(repo_dir().join("tests/oidc/provider.mjs"))
            .args(["--port", "0", "--client-key-out"])
            .arg(&client_key_path)
            .env("CUSTODIAN_TEST_OIDC_DIR", &packages_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        for audience in audiences {
            command.args(["--audience", audience]);
        }
        let mut process = command.spawn().expect("start node tests/oidc/provider.mjs");
        let stdin = process.stdin.take().expect("the provider's stdin is piped");
        let stdout = process
            .stdout
            .take()
            .expect("the provider's stdout is piped");

        // Its first stdout line is `READY <issuer>`; a blocking read, so on a thread of its own.
        let (ready_sender, ready) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut first_line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut first_line);
            let _ = ready_sender.send(first_line);
        });
        let first_line = match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Ok(line)) => line,
            Ok(Err(_)) => String::new(),
            Err(_) => {
                let _ = process.kill();
                panic!(
                    "the OpenID provider did not start within {READY_TIMEOUT:?}; see {}",
                    log_path.display()
                );
            }
        };
        let Some(issuer) = first_line.trim_end().strip_prefix("READY ") else {
            let _ = process.kill();
            let status = process.wait().expect("wait for the OpenID provider");
            panic!(
                "the OpenID provider exited ({status}) before it was ready:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        };

        // reqwest has rustls but no crypto provider of its own: without one it panics.
        custodian::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("build an HTTP client");
        let (client_key, client_key_id) = read_client_key(&client_key_path);
        let mut provider = OidcProvider {
            issuer: issuer.to_string(),
            token_endpoint: String::new(),
            process,
            _stdin: stdin,
            work_dir,
            client_key_path,
            client_key,
            client_key_id,
            http,
        };
        let discovery = provider.discovery().await;
        provider.token_endpoint = discovery["token_endpoint"]
            .as_str()
            .expect("the discovery document names a token_endpoint")
            .to_string();
        Some(provider)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The private key file of client `ehr-jwt`: JSON `{ kid, alg, private_jwk, private_key_pem }`.
    pub fn client_key_path(&self) -> &Path {
        &self.client_key_path
    }

    /// `GET /.well-known/openid-configuration`.
    pub async fn discovery(&self) -> Value {
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        self.get_json(&url).await
    }

    /// The provider's public signing keys, from the discovery document's `jwks_uri`.
    pub async fn jwks(&self) -> Value {
        let discovery = self.discovery().await;
        let jwks_uri = discovery["jwks_uri"]
            .as_str()
            .expect("the discovery document names a jwks_uri");
        self.get_json(jwks_uri).await
    }

    /// client_credentials with client_secret_basic (client `ehr-secret`); an empty scope is
    /// not sent.
    pub async fn client_secret_token(&self, scope: &str, resource: &str) -> String {
        let request = self
            .http
            .post(&self.token_endpoint)
            .basic_auth(EHR_SECRET_CLIENT_ID, Some(EHR_SECRET_CLIENT_SECRET))
            .form(&client_credentials_form(scope, resource));
        access_token(request.send().await).await
    }

    /// client_credentials with private_key_jwt (client `ehr-jwt`): the client assertion is an
    /// RS256 JWT signed here with the client's key, for the token endpoint.
    pub async fn private_key_jwt_token(&self, scope: &str, resource: &str) -> String {
        let assertion = self.client_assertion();
        let mut form = client_credentials_form(scope, resource);
        form.extend([
            ("client_id", EHR_JWT_CLIENT_ID),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ]);
        let request = self.http.post(&self.token_endpoint).form(&form);
        access_token(request.send().await).await
    }

    /// A token endpoint request as client `ehr-secret` with the given form (client_secret_basic),
    /// answered as is: for requests the provider refuses.
    pub async fn client_secret_token_response(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(&self.token_endpoint)
            .basic_auth(EHR_SECRET_CLIENT_ID, Some(EHR_SECRET_CLIENT_SECRET))
            .form(form)
            .send()
            .await
            .expect("reach the token endpoint")
    }

    /// `POST /test/mint` with the given JSON claims; returns the access token. Members, all
    /// optional: `sub` (default "test-user"), `roles`, `fhirUser`, `patient`, `scope`, `tenant`,
    /// `purpose_of_use` (copied as given); `expires_in` (default 300, negative for an expired
    /// token) and `nbf_offset` (default 0) in seconds from now; `aud` (default the first
    /// audience); `alg` (`RS256`, the default, or `ES256`); any other member is an extra claim.
    pub async fn mint(&self, claims: Value) -> String {
        let request = self
            .http
            .post(format!("{}/test/mint", self.issuer))
            .json(&claims);
        access_token(request.send().await).await
    }

    fn client_assertion(&self) -> String {
        let now = unix_time();
        let claims = json!({
            "iss": EHR_JWT_CLIENT_ID,
            "sub": EHR_JWT_CLIENT_ID,
            "aud": self.token_endpoint,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "exp": now + CLIENT_ASSERTION_LIFETIME_SECONDS,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.client_key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.client_key).expect("sign a client assertion")
    }

    async fn get_json(&self, url: &str) -> Value {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"));
        assert_eq!(response.status(), 200, "GET {url}");
        response.json().await.expect("a JSON body")
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        if std::thread::panicking() {
            eprintln!(
                "the OpenID provider's log and keys are kept in {}",
                self.work_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// The folder with the provider's installed packages, once node and they are there; `None`
/// (skipped, loudly) otherwise, which is a failure with CI=true.
fn installed_packages_dir() -> Option<PathBuf> {
    let packages_dir = std::env::var_os("CUSTODIAN_TEST_OIDC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("tests/oidc"));
    let packages_dir = std::path::absolute(&packages_dir).unwrap_or(packages_dir);
    let node_runs = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let problem = if !node_runs {
        "node is not installed".to_string()
    } else if !packages_dir.join("node_modules/oidc-provider").is_dir() {
        format!(
            "no node_modules/oidc-provider in {} (scripts/test runs npm ci there)",
            packages_dir.display()
        )
    } else {
        return Some(packages_dir);
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the OpenID provider cannot run and CI=true: {problem}");
    }
    eprintln!("\n*** SKIPPING the tests that need the OpenID provider: {problem} ***\n");
    None
}

/// The `ehr-jwt` key file the provider wrote: the signing key and its `kid`.
fn read_client_key(path: &Path) -> (EncodingKey, String) {
    let file: Value = serde_json::from_slice(
        &std::fs::read(path)
            .unwrap_or_else(|error| panic!("read the client key {}: {error}", path.display())),
    )
    .expect("the client key file is JSON");
    let pem = file["private_key_pem"]
        .as_str()
        .expect("the client key file has private_key_pem");
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("an RSA private key in PEM");
    let kid = file["kid"].as_str().expect("the client key file has a kid");
    (key, kid.to_string())
}

fn client_credentials_form<'a>(scope: &'a str, resource: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut form = vec![("grant_type", "client_credentials"), ("resource", resource)];
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    form
}

/// The `access_token` of a successful token response.
async fn access_token(response: reqwest::Result<reqwest::Response>) -> String {
    let response = response.expect("reach the OpenID provider");
    let status = response.status();
    let body = response.text().await.expect("a response body");
    assert_eq!(status, 200, "the OpenID provider refused: {body}");
    let body: Value = serde_json::from_str(&body).expect("a JSON token response");
    body["access_token"]
        .as_str()
        .expect("the token response has an access_token")
        .to_string()
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// A JWT's header and payload, decoded without any check of its signature.
fn decode_unverified(token: &str) -> (Value, Value) {
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(segments.len(), 3, "a JWS in compact form: {token}");
    let decode = |segment: &str| -> Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segment)
            .expect("a base64url segment");
        serde_json::from_slice(&bytes).expect("a JSON segment")
    };
    (decode(segments[0]), decode(segments[1]))
}

const FHIR_BASE: &str = "http://127.0.0.1:18080/fhir";
const OTHER_FHIR_BASE: &str = "http://127.0.0.1:18081/fhir";

/// SMART v2 scopes, a granular one with `?`, `=`, `&` and `|` among them.
const SMART_SCOPES: &str = "system/*.rs user/Observation.cruds \
    patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory&status=final";

/// Asserts the token is signed with a key of the provider's JWKS, with the `alg` that key has;
/// returns its payload.
async fn payload_of_provider_token(provider: &OidcProvider, token: &str) -> Value {
    let (header, payload) = decode_unverified(token);
    assert_eq!(header["typ"], "at+jwt", "{header}");
    let jwks = provider.jwks().await;
    let key = jwks["keys"]
        .as_array()
        .expect("the JWKS has keys")
        .iter()
        .find(|key| key["kid"] == header["kid"])
        .unwrap_or_else(|| panic!("the token's kid {} is in the JWKS {jwks}", header["kid"]));
    assert_eq!(key["alg"], header["alg"], "{header}");
    assert_eq!(payload["iss"], provider.issuer(), "{payload}");
    payload
}

fn roles(payload: &Value) -> Vec<&str> {
    payload["roles"]
        .as_array()
        .unwrap_or_else(|| panic!("a roles array in {payload}"))
        .iter()
        .map(|role| role.as_str().expect("a role is a string"))
        .collect()
}

#[tokio::test]
async fn discovery_names_the_issuer_and_a_public_jwks() {
    let Some(provider) = OidcProvider::start(&[FHIR_BASE]).await else {
        return;
    };
    let discovery = provider.discovery().await;
    assert_eq!(discovery["issuer"], provider.issuer());
    assert!(provider.issuer().starts_with("http://127.0.0.1:"));
    let jwks_uri = discovery["jwks_uri"].as_str().expect("a jwks_uri");
    assert!(jwks_uri.starts_with(provider.issuer()), "{jwks_uri}");
    let auth_methods = discovery["token_endpoint_auth_methods_supported"].to_string();
    for method in [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ] {
        assert!(auth_methods.contains(method), "{method} in {auth_methods}");
    }

    let jwks = provider.jwks().await;
    let keys = jwks["keys"].as_array().expect("the JWKS has keys");
    let algs: Vec<&str> = keys.iter().filter_map(|key| key["alg"].as_str()).collect();
    assert_eq!(algs, ["RS256", "ES256"], "{jwks}");
    for key in keys {
        assert!(key["kid"].is_string(), "{key}");
        for private_member in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(key.get(private_member).is_none(), "public keys only: {key}");
        }
    }
}

#[tokio::test]
async fn client_secret_token_is_a_jwt_for_the_requested_resource() {
    let Some(provider) = OidcProvider::start(&[FHIR_BASE, OTHER_FHIR_BASE]).await else {
        return;
    };
    // Something that is no SMART scope is dropped, as the provider drops scopes a resource
    // server does not have.
    let token = provider
        .client_secret_token(
            &format!("{SMART_SCOPES} not-a-smart-scope"),
            OTHER_FHIR_BASE,
        )
        .await;
    let payload = payload_of_provider_token(&provider, &token).await;
    assert_eq!(payload["aud"], OTHER_FHIR_BASE, "{payload}");
    assert_eq!(payload["scope"], SMART_SCOPES, "{payload}");
    assert_eq!(payload["client_id"], EHR_SECRET_CLIENT_ID, "{payload}");
    assert_eq!(payload["sub"], EHR_SECRET_CLIENT_ID, "{payload}");
    assert_eq!(roles(&payload), EHR_CLIENT_ROLES, "{payload}");
    assert_eq!(payload["tenant"], EHR_CLIENT_TENANT, "{payload}");
    assert_eq!(payload["purpose_of_use"], EHR_CLIENT_PURPOSE_OF_USE);
    assert!(payload["fhirUser"].is_null(), "{payload}");
    let (iat, exp) = (
        payload["iat"].as_u64().unwrap(),
        payload["exp"].as_u64().unwrap(),
    );
    assert!(iat.abs_diff(unix_time()) <= 5 && exp > iat, "{payload}");

    // The same client by client_secret_post, and without a resource: the default audience.
    let response = provider
        .http
        .post(&provider.token_endpoint)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", EHR_SECRET_CLIENT_ID),
            ("client_secret", EHR_SECRET_CLIENT_SECRET),
            ("scope", "system/*.rs"),
        ])
        .send()
        .await;
    let payload = payload_of_provider_token(&provider, &access_token(response).await).await;
    assert_eq!(payload["aud"], FHIR_BASE, "{payload}");
    assert_eq!(payload["scope"], "system/*.rs", "{payload}");
}

#[tokio::test]
async fn refuses_a_resource_it_was_not_started_for() {
    let Some(provider) = OidcProvider::start(&[FHIR_BASE]).await else {
        return;
    };
    let response = provider
        .client_secret_token_response(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.rs"),
            ("resource", OTHER_FHIR_BASE),
        ])
        .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_target", "{body}");

    let response = provider
        .http
        .post(&provider.token_endpoint)
        .basic_auth(EHR_SECRET_CLIENT_ID, Some("not-the-secret"))
        .form(&client_credentials_form("system/*.rs", FHIR_BASE))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn private_key_jwt_token_is_a_jwt_for_the_requested_resource() {
    let Some(provider) = OidcProvider::start(&[FHIR_BASE]).await else {
        return;
    };
    let token = provider
        .private_key_jwt_token("system/Patient.rs system/Observation.r", FHIR_BASE)
        .await;
    let payload = payload_of_provider_token(&provider, &token).await;
    assert_eq!(payload["aud"], FHIR_BASE, "{payload}");
    assert_eq!(payload["scope"], "system/Patient.rs system/Observation.r");
    assert_eq!(payload["client_id"], EHR_JWT_CLIENT_ID, "{payload}");
    assert_eq!(roles(&payload), EHR_CLIENT_ROLES, "{payload}");
    assert_eq!(payload["tenant"], EHR_CLIENT_TENANT, "{payload}");
    assert!(provider.client_key_path().is_file());
}

#[tokio::test]
async fn minted_user_token_carries_the_given_claims_and_times() {
    let Some(provider) = OidcProvider::start(&[FHIR_BASE]).await else {
        return;
    };
    let token = provider
        .mint(json!({
            "sub": "practitioner-123",
            "roles": ["practitioner", "compliance-officer"],
            "fhirUser": "Practitioner/123",
            "patient": "456",
            "scope": "user/*.rs patient/Observation.cruds launch/patient",
            "tenant": "clinic-a",
            "purpose_of_use": "TREAT",
            "expires_in": 900,
            "nbf_offset": 120,
            "custom_roles": ["admin"],
        }))
        .await;
    let payload = payload_of_provider_token(&provider, &token).await;
    assert_eq!(payload["sub"], "practitioner-123");
    assert_eq!(
        roles(&payload),
        ["practitioner", "compliance-officer"],
        "{payload}"
    );
    assert_eq!(payload["fhirUser"], "Practitioner/123");
    assert_eq!(payload["patient"], "456");
    assert_eq!(
        payload["scope"],
        "user/*.rs patient/Observation.cruds launch/patient"
    );
    assert_eq!(payload["tenant"], "clinic-a");
    assert_eq!(payload["purpose_of_use"], "TREAT");
    assert_eq!(payload["custom_roles"], json!(["admin"]));
    assert_eq!(payload["aud"], FHIR_BASE);
    assert_eq!(payload["client_id"], MINT_CLIENT_ID);
    let iat = payload["iat"].as_i64().expect("an iat");
    assert!(iat.abs_diff(unix_time() as i64) <= 5, "{payload}");
    assert_eq!(payload["nbf"].as_i64(), Some(iat + 120), "{payload}");
    assert_eq!(payload["exp"].as_i64(), Some(iat + 900), "{payload}");

    // Expired already, for another audience, signed ES256 with the provider's EC key.
    let token = provider
        .mint(json!({
            "expires_in": -60,
            "aud": "https://elsewhere.example/fhir",
            "alg": "ES256",
        }))
        .await;
    assert_eq!(decode_unverified(&token).0["alg"], "ES256");
    let payload = payload_of_provider_token(&provider, &token).await;
    assert_eq!(payload["sub"], "test-user");
    assert_eq!(payload["aud"], "https://elsewhere.example/fhir");
    let iat = payload["iat"].as_i64().expect("an iat");
    assert_eq!(payload["nbf"].as_i64(), Some(iat), "{payload}");
    assert_eq!(payload["exp"].as_i64(), Some(iat - 60), "{payload}");
    assert!(payload["roles"].is_null() && payload["scope"].is_null());
}
