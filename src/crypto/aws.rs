//! [`AwsKmsProvider`]: the key-encryption key lives in AWS KMS (or an API-compatible endpoint,
//! such as the emulator the integration suite runs) and never leaves it; data keys are made,
//! wrapped and unwrapped by KMS calls (`GenerateDataKey`, `Encrypt`, `Decrypt`), each bound to
//! the data key's [`KeyContext`] as the KMS encryption context.
//!
//! Every call is bounded in time twice over: the SDK's operation timeout (which covers its
//! retries, kept to two attempts) and a `tokio::time::timeout` around it, so a KMS that is down
//! or hangs turns into [`CryptoError::Unavailable`] (503) within the configured timeout instead
//! of holding requests. KMS's answers are mapped by what they mean for us: a ciphertext or
//! context that does not authenticate is [`CryptoError::Integrity`]; throttling and server-side
//! failures are [`CryptoError::Unavailable`]; anything else (denied access, an unknown or
//! disabled key) is a misconfiguration, [`CryptoError::Internal`].
//!
//! Nothing here logs: neither key material (never) nor the encryption context (it holds no PHI,
//! but the callers decide what to log along with the error).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use zeroize::Zeroizing;

use super::{CryptoError, CryptoResult, DataKey, KeyContext, KeyProvider, WrappedKey};

/// Attempts per KMS call: the first and one retry. Enough to ride out a dropped connection or a
/// single throttled request; more would only spend the timeout on a KMS that is down.
const MAX_ATTEMPTS: u32 = 2;

/// KMS error codes meaning the ciphertext (or the encryption context bound into it) does not
/// authenticate, or was not made under the key named: tampering or a misplaced row.
const INTEGRITY_CODES: &[&str] = &["InvalidCiphertextException", "IncorrectKeyException"];

/// KMS error codes meaning "not now": KMS or a dependency of it is overloaded or failing, and
/// the same request may succeed later.
const TRANSIENT_CODES: &[&str] = &[
    "DependencyTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Data keys from AWS KMS (or an API-compatible endpoint).
#[derive(Debug, Clone)]
pub struct AwsKmsProvider {
    client: aws_sdk_kms::Client,
    /// The KMS key (id, ARN or alias) that new data keys are made and wrapped under.
    key_id: String,
    /// The bound on each call, retries included.
    timeout: Duration,
}

impl AwsKmsProvider {
    /// key_id: KMS key id/ARN/alias for new data keys; region: e.g. "us-east-1" (None: from the AWS chain);
    /// endpoint_url: an API-compatible endpoint (None: AWS); timeout: per KMS call, whole operation incl. retries.
    ///
    /// Credentials come from the usual AWS chain (environment, profile, web identity, container
    /// or instance role). Nothing is called here: a KMS that is unreachable shows on first use.
    pub async fn new(
        key_id: String,
        region: Option<String>,
        endpoint_url: Option<String>,
        timeout: Duration,
    ) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(timeout)
            .connect_timeout(timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint_url) = endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        let sdk_config = loader.load().await;
        Self {
            client: aws_sdk_kms::Client::new(&sdk_config),
            key_id,
            timeout,
        }
    }

    /// Awaits one KMS call, bounded by the timeout, with its error mapped to a [`CryptoError`].
    async fn call<T, E>(
        &self,
        operation: &'static str,
        request: impl Future<Output = Result<T, SdkError<E>>>,
    ) -> CryptoResult<T>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        // The SDK's own operation timeout should fire first; this one also covers what it might
        // not (credential resolution that hangs, a stalled response body).
        match tokio::time::timeout(self.timeout, request).await {
            Err(_elapsed) => Err(CryptoError::Unavailable(format!(
                "KMS {operation} did not answer within {:?}",
                self.timeout
            ))),
            Ok(result) => result.map_err(|error| classify(operation, &error)),
        }
    }
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    /// The configured key id (possibly an alias or a bare key id). Wrapped keys record instead
    /// the key ARN that KMS (and moto) return as `KeyId` in responses: storing that ARN as
    /// `kek_id` keeps every `Decrypt` explicit about which key it expects, even after an alias is
    /// pointed at a new key.
    fn current_kek_id(&self) -> String {
        self.key_id.clone()
    }

    async fn generate_data_key(&self, context: &KeyContext) -> CryptoResult<(DataKey, WrappedKey)> {
        let response = self
            .call(
                "GenerateDataKey",
                self.client
                    .generate_data_key()
                    .key_id(&self.key_id)
                    .key_spec(DataKeySpec::Aes256)
                    .set_encryption_context(Some(encryption_context(context)))
                    .send(),
            )
            .await?;
        let (Some(plaintext), Some(ciphertext), Some(kek_id)) = (
            response.plaintext,
            response.ciphertext_blob,
            response.key_id,
        ) else {
            return Err(CryptoError::Internal(
                "KMS GenerateDataKey answered without Plaintext, CiphertextBlob or KeyId".into(),
            ));
        };
        // A key of the wrong size from GenerateDataKey is KMS misbehaving, not tampering.
        let key = data_key_from(plaintext).ok_or_else(|| {
            CryptoError::Internal("KMS GenerateDataKey returned a key that is not 32 bytes".into())
        })?;
        Ok((
            key,
            WrappedKey {
                kek_id,
                ciphertext: ciphertext.into_inner(),
            },
        ))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &KeyContext,
    ) -> CryptoResult<DataKey> {
        let response = self
            .call(
                "Decrypt",
                self.client
                    .decrypt()
                    // Naming the key makes KMS refuse a ciphertext made under any other key
                    // (IncorrectKeyException) instead of decrypting it with whichever key it names.
                    .key_id(&wrapped.kek_id)
                    .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
                    .set_encryption_context(Some(encryption_context(context)))
                    .send(),
            )
            .await?;
        let Some(plaintext) = response.plaintext else {
            return Err(CryptoError::Internal(
                "KMS Decrypt answered without Plaintext".into(),
            ));
        };
        // It authenticated under our context but is not a data key: whatever it is, it is not
        // what this row should hold, so it is never used.
        data_key_from(plaintext).ok_or_else(|| {
            CryptoError::Integrity(format!(
                "the wrapped key under {} does not unwrap to a 32-byte data key",
                wrapped.kek_id
            ))
        })
    }

    async fn wrap_data_key(&self, key: &DataKey, context: &KeyContext) -> CryptoResult<WrappedKey> {
        let response = self
            .call(
                "Encrypt",
                self.client
                    .encrypt()
                    .key_id(&self.key_id)
                    // The SDK takes the plaintext as an owned Vec and drops it after sending,
                    // without wiping it; no API takes a borrowed or zeroizing buffer.
                    .plaintext(Blob::new(key.to_vec()))
                    .set_encryption_context(Some(encryption_context(context)))
                    .send(),
            )
            .await?;
        let (Some(ciphertext), Some(kek_id)) = (response.ciphertext_blob, response.key_id) else {
            return Err(CryptoError::Internal(
                "KMS Encrypt answered without CiphertextBlob or KeyId".into(),
            ));
        };
        Ok(WrappedKey {
            kek_id,
            ciphertext: ciphertext.into_inner(),
        })
    }
}

/// The KMS encryption context of a data key.
fn encryption_context(context: &KeyContext) -> HashMap<String, String> {
    context
        .pairs()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// Copies a plaintext data key out of the SDK's `Blob` into a [`DataKey`], wiping the `Blob`'s
/// buffer as it goes; `None` when it is not 32 bytes.
fn data_key_from(plaintext: Blob) -> Option<DataKey> {
    let plaintext = Zeroizing::new(plaintext.into_inner());
    if plaintext.len() != 32 {
        return None;
    }
    let mut key = DataKey::new([0; 32]);
    key.copy_from_slice(&plaintext);
    Some(key)
}

/// Maps a failed KMS call to what it means for a request: retry later (503), an integrity alarm,
/// or a misconfiguration.
fn classify<E>(operation: &str, error: &SdkError<E>) -> CryptoError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = format!("KMS {operation}: {}", DisplayErrorContext(error));
    match error {
        // No answer (connection refused or reset, DNS, TLS, the SDK's timeout) or an answer that
        // is not KMS's (a truncated or garbled response, say from a proxy): try again later.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CryptoError::Unavailable(detail)
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            let status = service.raw().status().as_u16();
            if INTEGRITY_CODES.contains(&code) {
                CryptoError::Integrity(detail)
            } else if TRANSIENT_CODES.contains(&code) || status == 429 || status >= 500 {
                CryptoError::Unavailable(detail)
            } else {
                // AccessDeniedException, NotFoundException, DisabledException,
                // KMSInvalidStateException, an invalid key usage, bad credentials: the
                // deployment is misconfigured (wrong key, policy or role), which says nothing
                // about the stored ciphertext being tampered with, and retrying will not help.
                CryptoError::Internal(detail)
            }
        }
        // The request could not be built (no region, no credentials, an invalid parameter).
        _ => CryptoError::Internal(detail),
    }
}
