//! Envelope encryption of every stored resource version.
//!
//! - A **key provider** ([`KeyProvider`]) holds the key-encryption keys (KEKs) and wraps and
//!   unwraps data keys: [`aws::AwsKmsProvider`] (AWS KMS or an API-compatible endpoint) or
//!   [`local::LocalKeyProvider`] (a key file; the development default).
//! - One **data key** (DEK, AES-256) per patient compartment, and one per tenant for resources
//!   outside any compartment; stored only wrapped (table `data_keys`), held in clear only in the
//!   bounded, zeroizing [`cache::DataKeyCache`].
//! - Each version's body is sealed by [`envelope`] with a per-record subkey (HKDF-SHA256 of the
//!   DEK with a random salt) under AES-256-GCM, its additional data binding the ciphertext to
//!   tenant, type, id, version and compartment.
//!
//! [`vault::Vault`] ties these together for the API: `seal` before a write, `open` after a read.
//! Nothing here ever falls back to plaintext: a provider that cannot answer makes the request
//! fail with 503, a ciphertext that does not authenticate makes it fail with 500 and an
//! integrity alarm in the log.

pub mod aws;
pub mod cache;
pub mod envelope;
pub mod local;
pub mod vault;

use async_trait::async_trait;
use zeroize::Zeroizing;

/// A data key in clear: 32 bytes, wiped from memory when dropped.
pub type DataKey = Zeroizing<[u8; 32]>;

/// A data key as the provider wrapped it, with the id of the KEK that wrapped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The KEK that wrapped this key (a local key version like `local:2`, or a KMS key ARN/id).
    pub kek_id: String,
    /// The provider's ciphertext of the data key.
    pub ciphertext: Vec<u8>,
}

/// What a data key is bound to. Providers pass it as the KMS encryption context (or the AEAD
/// additional data of a local wrap), so a wrapped key only unwraps for the compartment it was
/// made for. It never holds PHI: KMS logs the encryption context in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyContext {
    /// The tenant.
    pub tenant: String,
    /// The data key's own id (a random UUID).
    pub key_id: String,
    /// The compartment pseudonym, or `None` for the tenant's key.
    pub compartment: Option<String>,
}

impl KeyContext {
    /// The context as ordered name/value pairs (`tenant`, `purpose`, `key`, `compartment`).
    pub fn pairs(&self) -> [(&'static str, String); 4] {
        [
            ("tenant", self.tenant.clone()),
            ("purpose", "custodian-resource-dek".to_string()),
            ("key", self.key_id.clone()),
            (
                "compartment",
                self.compartment
                    .clone()
                    .unwrap_or_else(|| "tenant".to_string()),
            ),
        ]
    }
}

/// Errors of key providers and envelope encryption.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The provider (KMS) cannot be reached or timed out: retry later (503).
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    /// A ciphertext or wrapped key does not authenticate: tampering or a misplaced row (500,
    /// integrity alarm). Never answered with data.
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// Misconfiguration or a broken invariant (500).
    #[error("crypto error: {0}")]
    Internal(String),
}

/// `Result` with [`CryptoError`] as the default error.
pub type CryptoResult<T, E = CryptoError> = Result<T, E>;

/// Holds key-encryption keys and wraps/unwraps data keys with them.
#[async_trait]
pub trait KeyProvider: Send + Sync + 'static {
    /// `aws` or `local`.
    fn name(&self) -> &'static str;

    /// The KEK new data keys are wrapped under.
    fn current_kek_id(&self) -> String;

    /// A new random AES-256 data key, in clear and wrapped under the current KEK.
    ///
    /// # Errors
    /// [`CryptoError::Unavailable`] when the provider does not answer in time.
    async fn generate_data_key(&self, context: &KeyContext) -> CryptoResult<(DataKey, WrappedKey)>;

    /// Unwraps a data key; the context must be the one it was generated with.
    ///
    /// # Errors
    /// [`CryptoError::Unavailable`] when the provider does not answer in time,
    /// [`CryptoError::Integrity`] when the wrapped key or context does not authenticate.
    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &KeyContext,
    ) -> CryptoResult<DataKey>;

    /// Wraps an existing data key under the current KEK (rotation re-wraps, never re-encrypts
    /// bodies).
    ///
    /// # Errors
    /// [`CryptoError::Unavailable`] when the provider does not answer in time.
    async fn wrap_data_key(&self, key: &DataKey, context: &KeyContext) -> CryptoResult<WrappedKey>;
}

/// The key provider the settings name.
///
/// # Errors
/// A message when the provider cannot be set up (a missing KMS key id, an unreadable key file).
pub async fn provider_from_settings(
    settings: &crate::config::Settings,
) -> Result<std::sync::Arc<dyn KeyProvider>, String> {
    use crate::config::KeyProviderKind;
    match settings.keys.provider {
        KeyProviderKind::Local => {
            local::LocalKeyProvider::load_or_create(&settings.local_key_dir())
                .map(|provider| std::sync::Arc::new(provider) as std::sync::Arc<dyn KeyProvider>)
                .map_err(|error| format!("local key provider: {error}"))
        }
        KeyProviderKind::Aws => {
            let key_id = settings.keys.aws_key_id.clone().ok_or(
                "keys.aws_key_id (CUSTODIAN_KEYS__AWS_KEY_ID) is required with the aws provider",
            )?;
            let provider = aws::AwsKmsProvider::new(
                key_id,
                settings.keys.aws_region.clone(),
                settings.keys.aws_endpoint_url.clone(),
                std::time::Duration::from_millis(settings.keys.timeout_ms.max(1)),
            )
            .await;
            Ok(std::sync::Arc::new(provider))
        }
    }
}
