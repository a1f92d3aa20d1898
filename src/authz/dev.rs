//! The development token issuer: an ES256 key kept in the data directory (created 0600 on first
//! use) that `custodian token` signs with. The server trusts it only in dev mode, which is on for
//! the embedded default and refused together with any production setting (PostgreSQL, AWS KMS,
//! or a configured OIDC issuer).

use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::json;
use zeroize::Zeroizing;

/// The `iss` of development tokens.
pub const DEV_ISSUER: &str = "urn:custodian:dev-issuer";
const KEY_FILE: &str = "dev-issuer-es256.p8";

/// The signing and verification keys of the development issuer.
pub struct DevIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// What a development token says.
#[derive(Debug, Clone, Default)]
pub struct DevTokenRequest {
    pub subject: String,
    pub roles: Vec<String>,
    pub fhir_user: Option<String>,
    pub patient: Option<String>,
    pub scope: String,
    pub tenant: Option<String>,
    pub purpose_of_use: Option<String>,
    pub lifetime_secs: i64,
}

fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

impl DevIssuer {
    /// Loads the key from the data directory, creating it on first use.
    ///
    /// # Errors
    /// A message when the key file cannot be read, written, or parsed.
    pub fn load_or_create(data_dir: &Path) -> Result<DevIssuer, String> {
        let path = key_file(data_dir);
        if !path.exists() {
            create_key(&path)?;
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?,
        );
        let pkcs8 = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| format!("{} is not base64", path.display()))?,
        );
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .map_err(|_| format!("{} is not an ES256 key", path.display()))?;
        let point = pair.public_key().as_ref();
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        if point.len() != 65 {
            return Err("unexpected public key encoding".into());
        }
        let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let decoding =
            DecodingKey::from_ec_components(&encode(&point[1..33]), &encode(&point[33..]))
                .map_err(|error| format!("dev issuer public key: {error}"))?;
        Ok(DevIssuer {
            encoding: EncodingKey::from_ec_der(&pkcs8),
            decoding,
        })
    }

    /// The verification key.
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// Signs arbitrary claims with the development key (ES256, kid `custodian-dev`): the test
    /// suite uses it to build tokens that must be refused (expired, wrong audience, …).
    ///
    /// # Errors
    /// A message if signing fails.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("custodian-dev".into());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|error| error.to_string())
    }

    /// Signs a development access token for `audience`.
    ///
    /// # Errors
    /// A message if signing fails.
    pub fn mint(&self, audience: &str, request: &DevTokenRequest) -> Result<String, String> {
        let now = chrono::Utc::now().timestamp();
        let mut claims = json!({
            "iss": DEV_ISSUER,
            "sub": request.subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + request.lifetime_secs.max(1),
            "client_id": "custodian-dev",
            "roles": request.roles,
            "scope": request.scope,
        });
        for (name, value) in [
            ("fhirUser", &request.fhir_user),
            ("patient", &request.patient),
            ("tenant", &request.tenant),
            ("purpose_of_use", &request.purpose_of_use),
        ] {
            if let Some(value) = value {
                claims[name] = json!(value);
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("custodian-dev".into());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|error| error.to_string())
    }
}

fn create_key(path: &Path) -> Result<(), String> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
    }
    let document =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| "cannot generate the dev issuer key".to_string())?;
    let encoded =
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(document.as_ref()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
    file.write_all(encoded.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", path.display()))
}
