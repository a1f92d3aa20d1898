//! Bearer-token authentication: every access token is a JWT checked against an issuer this
//! server trusts — its signature (an allow-list of RS256, RS384, ES256, ES384; never `none`, and
//! never an HMAC, so a public key can never be used as a shared secret), `iss`, `aud` (this
//! server), `exp` and `nbf` with a small leeway — then turned into a [`Principal`].
//!
//! Issuers are discovered with openidconnect (`.well-known/openid-configuration`); their JWKS is
//! fetched on first use and again when a token names an unknown `kid`, at most once per
//! [`JWKS_REFRESH_INTERVAL`] per issuer. Validated tokens are cached by their SHA-256 until they
//! expire, so the signature check (≈ 0.5 ms for RSA) is paid once per token, not per request.
//! Why a token failed goes to the log (never the token); the client gets a bare 401.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::dev::{DevIssuer, DEV_ISSUER};
use super::principal::{FhirUser, Principal};
use super::scopes::Scopes;

/// The algorithms a token may be signed with.
const ALLOWED_ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Least time between two JWKS fetches of one issuer, so that tokens with random `kid`s cannot
/// make the server hammer the IdP.
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Why a token was refused (logged, never returned).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token header: {0}")]
    MalformedHeader(String),
    #[error("algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(Algorithm),
    #[error("issuer is not trusted")]
    UntrustedIssuer,
    #[error("no key with this kid at the issuer")]
    UnknownKey,
    #[error("issuer unavailable: {0}")]
    IssuerUnavailable(String),
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token is for another tenant")]
    WrongTenant,
}

/// A trusted OIDC issuer and its cached keys.
struct RemoteIssuer {
    issuer: String,
    keys: Mutex<IssuerKeys>,
}

#[derive(Default)]
struct IssuerKeys {
    jwks: Option<Arc<JwkSet>>,
    fetched_at: Option<Instant>,
    endpoints: Option<IssuerEndpoints>,
}

/// What discovery says about an issuer, for `/.well-known/smart-configuration`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuerEndpoints {
    pub issuer: String,
    pub jwks_uri: String,
    pub authorization_endpoint: String,
    pub token_endpoint: Option<String>,
}

/// Validates access tokens.
pub struct TokenValidator {
    audience: String,
    roles_claim: String,
    tenant: String,
    leeway_secs: u64,
    issuers: Vec<RemoteIssuer>,
    dev: Option<DevIssuer>,
    http: reqwest::Client,
    cache: moka::sync::Cache<[u8; 32], Arc<Principal>>,
}

/// What the validator needs to know.
pub struct ValidatorSettings {
    /// The `aud` tokens must carry (this server's base URL).
    pub audience: String,
    /// Issuer URLs to trust.
    pub issuers: Vec<String>,
    /// The claim holding roles.
    pub roles_claim: String,
    /// The tenant this server serves; a token naming another is refused.
    pub tenant: String,
    /// Clock leeway for `exp`/`nbf`, seconds.
    pub leeway_secs: u64,
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

impl TokenValidator {
    /// A validator trusting `settings.issuers` and, when given, the development issuer.
    pub fn new(settings: ValidatorSettings, dev: Option<DevIssuer>) -> Self {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            // Discovery must not be redirected elsewhere (SSRF, issuer mix-up).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        TokenValidator {
            audience: settings.audience,
            roles_claim: settings.roles_claim,
            tenant: settings.tenant,
            leeway_secs: settings.leeway_secs,
            issuers: settings
                .issuers
                .into_iter()
                .map(|issuer| RemoteIssuer {
                    issuer: issuer.trim_end_matches('/').to_string(),
                    keys: Mutex::new(IssuerKeys::default()),
                })
                .collect(),
            dev,
            http,
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }
    }

    /// The development issuer, when trusted.
    pub fn dev_issuer(&self) -> Option<&DevIssuer> {
        self.dev.as_ref()
    }

    /// The audience tokens must carry.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Validates a bearer token and returns its principal.
    ///
    /// # Errors
    /// [`AuthError`] saying why (for the log).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.cache.get(&digest) {
            if principal.expires_at + self.leeway_secs as i64 > chrono::Utc::now().timestamp() {
                return Ok(principal);
            }
            self.cache.invalidate(&digest);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| AuthError::MalformedHeader(error.to_string()))?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(header.alg));
        }
        // The issuer picks the keys; the signature check below then proves it.
        let unverified: IssuerOnly = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|error| AuthError::Invalid(error.to_string()))?;
        let issuer = unverified.iss.ok_or(AuthError::UntrustedIssuer)?;
        let key = self.key_for(&issuer, header.kid.as_deref()).await?;

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|error| AuthError::Invalid(error.to_string()))?;
        let principal = Arc::new(self.principal(&issuer, data.claims)?);
        self.cache.insert(digest, principal.clone());
        Ok(principal)
    }

    async fn key_for(&self, issuer: &str, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        if issuer == DEV_ISSUER {
            return self
                .dev
                .as_ref()
                .map(|dev| dev.decoding_key().clone())
                .ok_or(AuthError::UntrustedIssuer);
        }
        let remote = self
            .issuers
            .iter()
            .find(|remote| remote.issuer == issuer.trim_end_matches('/'))
            .ok_or(AuthError::UntrustedIssuer)?;
        let kid = kid.ok_or(AuthError::UnknownKey)?;
        let mut keys = remote.keys.lock().await;
        let known = |jwks: &JwkSet| jwks.find(kid).cloned();
        let mut jwk = keys.jwks.as_deref().and_then(known);
        let may_refresh = keys
            .fetched_at
            .is_none_or(|fetched| fetched.elapsed() >= JWKS_REFRESH_INTERVAL);
        if jwk.is_none() && may_refresh {
            keys.fetched_at = Some(Instant::now());
            let (fetched, endpoints) = self.fetch_jwks(&remote.issuer).await?;
            let fetched = Arc::new(fetched);
            jwk = known(&fetched);
            keys.jwks = Some(fetched);
            keys.endpoints = Some(endpoints);
        }
        let jwk = jwk.ok_or(AuthError::UnknownKey)?;
        DecodingKey::from_jwk(&jwk).map_err(|error| AuthError::Invalid(error.to_string()))
    }

    /// The first trusted issuer's endpoints, discovering them if needed (`None` when no issuer
    /// is configured or it cannot be reached).
    pub async fn first_issuer_endpoints(&self) -> Option<IssuerEndpoints> {
        let remote = self.issuers.first()?;
        let mut keys = remote.keys.lock().await;
        if keys.endpoints.is_none() {
            let may_refresh = keys
                .fetched_at
                .is_none_or(|fetched| fetched.elapsed() >= JWKS_REFRESH_INTERVAL);
            if may_refresh {
                keys.fetched_at = Some(Instant::now());
                match self.fetch_jwks(&remote.issuer).await {
                    Ok((jwks, endpoints)) => {
                        keys.jwks = Some(Arc::new(jwks));
                        keys.endpoints = Some(endpoints);
                    }
                    Err(error) => tracing::warn!(%error, "issuer discovery failed"),
                }
            }
        }
        keys.endpoints.clone()
    }

    async fn fetch_jwks(&self, issuer: &str) -> Result<(JwkSet, IssuerEndpoints), AuthError> {
        use openidconnect::core::CoreProviderMetadata;
        use openidconnect::IssuerUrl;
        let issuer_url = IssuerUrl::new(issuer.to_string())
            .map_err(|error| AuthError::IssuerUnavailable(error.to_string()))?;
        // Discovery also checks that the document names this very issuer.
        let metadata = CoreProviderMetadata::discover_async(issuer_url, &self.http)
            .await
            .map_err(|error| AuthError::IssuerUnavailable(format!("discovery: {error}")))?;
        let jwks_uri = metadata.jwks_uri().url().clone();
        let endpoints = IssuerEndpoints {
            issuer: issuer.to_string(),
            jwks_uri: jwks_uri.to_string(),
            authorization_endpoint: metadata.authorization_endpoint().url().to_string(),
            token_endpoint: metadata
                .token_endpoint()
                .map(|endpoint| endpoint.url().to_string()),
        };
        let response = self
            .http
            .get(jwks_uri)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| AuthError::IssuerUnavailable(format!("jwks: {error}")))?;
        let jwks = response
            .json::<JwkSet>()
            .await
            .map_err(|error| AuthError::IssuerUnavailable(format!("jwks: {error}")))?;
        Ok((jwks, endpoints))
    }

    fn principal(&self, issuer: &str, claims: Map<String, Value>) -> Result<Principal, AuthError> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let tenant = text("tenant");
        if tenant
            .as_deref()
            .is_some_and(|tenant| tenant != self.tenant)
        {
            return Err(AuthError::WrongTenant);
        }
        let roles = match claims.get(&self.roles_claim) {
            Some(Value::Array(roles)) => roles
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(roles)) => roles.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let (scopes, ignored) = Scopes::parse(&text("scope").unwrap_or_default());
        if !ignored.is_empty() {
            tracing::info!(
                count = ignored.len(),
                "token scopes ignored as malformed or unknown"
            );
        }
        // Every access is audited with its agent, so a token must name one: its subject, or for a
        // client acting on its own behalf (client credentials) the client, as RFC 9068 has `sub`
        // say. A token naming neither is refused rather than audited as an anonymous agent.
        let client_id = text("client_id").or_else(|| text("azp"));
        let subject = text("sub")
            .filter(|subject| !subject.is_empty())
            .or_else(|| client_id.clone().filter(|client| !client.is_empty()))
            .ok_or_else(|| AuthError::Invalid("the token names no subject (sub)".to_string()))?;
        Ok(Principal {
            subject,
            client_id,
            issuer: issuer.to_string(),
            fhir_user: text("fhirUser").as_deref().and_then(FhirUser::parse),
            roles,
            scopes,
            patient: text("patient").filter(|id| crate::fhir::is_valid_id(id)),
            tenant,
            purpose_of_use: text("purpose_of_use"),
            expires_at: claims
                .get("exp")
                .and_then(Value::as_i64)
                .unwrap_or_default(),
            emergency: None,
        })
    }
}
