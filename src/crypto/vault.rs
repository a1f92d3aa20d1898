//! The vault: the API's one door to encryption. `seal` turns a version's JSON into ciphertext
//! under its compartment's data key (creating that key on first use); `open` turns a stored
//! version back into JSON. Data keys come from the cache, else from the store (wrapped) and the
//! provider (unwrapped), within the provider timeout.

use std::sync::Arc;
use std::time::Duration;

use super::cache::{CacheStats, DataKeyCache};
use super::envelope::{self, RecordBinding};
use super::{CryptoError, CryptoResult, DataKey, KeyContext, KeyProvider, WrappedKey};
use crate::store::{Scope, Store, StoreError, StoredDataKey, VersionRecord};

/// Errors of the vault: crypto or the store holding the wrapped keys.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `Result` with [`VaultError`] as the default error.
pub type VaultResult<T, E = VaultError> = Result<T, E>;

/// Seals and opens resource bodies.
pub struct Vault {
    provider: Arc<dyn KeyProvider>,
    store: Arc<dyn Store>,
    cache: DataKeyCache,
    timeout: Duration,
}

/// A compartment's data key, as [`Vault::compartment_key`] found it (the key bytes stay inside
/// the crypto module).
#[derive(Clone)]
pub struct CompartmentKey {
    key_id: String,
    key: Arc<DataKey>,
}

/// A body sealed for one row.
pub struct Sealed {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
}

impl Vault {
    /// A vault over `provider`, with wrapped keys in `store`, a cache of at most `cache_entries`
    /// keys kept at most `cache_age`, and `timeout` per provider call.
    pub fn new(
        provider: Arc<dyn KeyProvider>,
        store: Arc<dyn Store>,
        cache_entries: u64,
        cache_age: Duration,
        timeout: Duration,
    ) -> Self {
        Vault {
            provider,
            store,
            cache: DataKeyCache::new(cache_entries, cache_age),
            timeout,
        }
    }

    /// The key provider (`keys` commands).
    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    /// Drops erased data keys from this node's cache (their bytes are wiped once no request
    /// holds them). Other nodes learn of an erasure from the `erasures` table
    /// ([`crate::erasure`]).
    pub fn forget(&self, key_ids: &[String]) {
        for key_id in key_ids {
            self.cache.invalidate(key_id);
        }
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Seals `plaintext` as version `version` of `resource_type/id` in `compartment`.
    ///
    /// # Errors
    /// 503-class when the provider or the database is unavailable.
    pub async fn seal(
        &self,
        scope: &Scope,
        compartment: Option<&str>,
        resource_type: &str,
        id: &str,
        version: i64,
        plaintext: &[u8],
    ) -> VaultResult<Sealed> {
        let key = self.compartment_key(scope, compartment).await?;
        self.seal_with(
            &key,
            scope,
            compartment,
            resource_type,
            id,
            version,
            plaintext,
        )
        .await
    }

    /// Seals like [`Vault::seal`] under a key already found with [`Vault::compartment_key`]
    /// for the same scope and compartment (a transaction bundle looks a compartment's key up
    /// once for all its writes).
    ///
    /// # Errors
    /// As [`Vault::seal`].
    #[allow(clippy::too_many_arguments)]
    pub async fn seal_with(
        &self,
        key: &CompartmentKey,
        scope: &Scope,
        compartment: Option<&str>,
        resource_type: &str,
        id: &str,
        version: i64,
        plaintext: &[u8],
    ) -> VaultResult<Sealed> {
        let binding = RecordBinding {
            tenant: scope.tenant(),
            resource_type,
            id,
            version,
            compartment,
        };
        let ciphertext = if plaintext.len() < OFFLOAD_BYTES {
            envelope::seal(&key.key, &binding, plaintext)?
        } else {
            let owned = OwnedBinding::of(&binding);
            let plaintext = plaintext.to_vec();
            let data_key = key.key.clone();
            tokio::task::spawn_blocking(move || {
                envelope::seal(&data_key, &owned.borrow(), &plaintext)
            })
            .await
            .map_err(|_| CryptoError::Internal("sealing task failed".into()))??
        };
        Ok(Sealed {
            key_id: key.key_id.clone(),
            ciphertext,
        })
    }

    /// The JSON of a stored version (`None` for a deletion).
    ///
    /// # Errors
    /// [`CryptoError::Integrity`] when a body is unsealed, sealed for another row or altered;
    /// 503-class when a key cannot be fetched.
    pub async fn open(
        &self,
        scope: &Scope,
        record: &VersionRecord,
    ) -> VaultResult<Option<Vec<u8>>> {
        let Some(sealed) = &record.body else {
            return Ok(None);
        };
        let Some(key_id) = &record.key_id else {
            // Never serve a body that is not sealed: it means the row did not come from here.
            return Err(integrity_alarm(record, "a stored body carries no data key"));
        };
        let key = self.key_by_id(scope, key_id).await?;
        let binding = RecordBinding {
            tenant: scope.tenant(),
            resource_type: &record.resource_type,
            id: &record.id,
            version: record.version,
            compartment: record.compartment.as_deref(),
        };
        let opened = if sealed.len() < OFFLOAD_BYTES {
            envelope::open(&key, &binding, sealed)
        } else {
            let owned = OwnedBinding::of(&binding);
            let sealed = sealed.clone();
            tokio::task::spawn_blocking(move || envelope::open(&key, &owned.borrow(), &sealed))
                .await
                .map_err(|_| CryptoError::Internal("opening task failed".into()))?
        };
        match opened {
            Ok(plaintext) => Ok(Some(plaintext)),
            Err(CryptoError::Integrity(reason)) => Err(integrity_alarm(record, &reason)),
            Err(other) => Err(other.into()),
        }
    }

    /// A key for `purpose` derived from the tenant's data key (HKDF-SHA256, the purpose as
    /// info), e.g. the search index key: it is as protected as the data key, which only the
    /// KMS can unwrap, and never stored.
    ///
    /// # Errors
    /// 503-class when the provider or the database is unavailable.
    pub async fn derived_key(&self, scope: &Scope, purpose: &str) -> VaultResult<DataKey> {
        let key = self.compartment_key(scope, None).await?.key;
        let mut derived = zeroize::Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, key.as_slice())
            .expand(purpose.as_bytes(), derived.as_mut_slice())
            .map_err(|_| CryptoError::Internal("HKDF output length".into()))?;
        Ok(derived)
    }

    /// The data key of a compartment (or the tenant), made on first use.
    /// The data key of `compartment` (the tenant's own key for `None`), created on first use.
    ///
    /// # Errors
    /// 503-class when the provider or the database is unavailable.
    pub async fn compartment_key(
        &self,
        scope: &Scope,
        compartment: Option<&str>,
    ) -> VaultResult<CompartmentKey> {
        if let Some(stored) = self.store.find_data_key(scope, compartment).await? {
            let key = self.unwrap_cached(&stored).await?;
            return Ok(CompartmentKey {
                key_id: stored.key_id,
                key,
            });
        }
        let key_id = uuid::Uuid::new_v4().to_string();
        let context = KeyContext {
            tenant: scope.tenant().to_string(),
            key_id: key_id.clone(),
            compartment: compartment.map(str::to_string),
        };
        let (key, wrapped) = self
            .with_timeout(self.provider.generate_data_key(&context))
            .await?;
        let stored = StoredDataKey {
            key_id: key_id.clone(),
            tenant: scope.tenant().to_string(),
            compartment: compartment.map(str::to_string),
            kek_id: wrapped.kek_id,
            wrapped: wrapped.ciphertext,
        };
        if self.store.insert_data_key(&stored).await? {
            let key = Arc::new(key);
            self.cache.insert(key_id.clone(), key.clone());
            return Ok(CompartmentKey { key_id, key });
        }
        // A concurrent request made the compartment's key first: use that one.
        let winner = self
            .store
            .find_data_key(scope, compartment)
            .await?
            .ok_or_else(|| CryptoError::Internal("data key vanished after a conflict".into()))?;
        let key = self.unwrap_cached(&winner).await?;
        Ok(CompartmentKey {
            key_id: winner.key_id,
            key,
        })
    }

    async fn key_by_id(&self, scope: &Scope, key_id: &str) -> VaultResult<Arc<DataKey>> {
        if let Some(key) = self.cache.get(key_id) {
            return Ok(key);
        }
        let stored = self
            .store
            .data_key_by_id(scope, key_id)
            .await?
            .ok_or_else(|| {
                // Erased (crypto-shredded) or never existed: the body cannot be read, by design.
                CryptoError::Integrity("the body's data key does not exist".into())
            })?;
        self.unwrap_cached(&stored).await
    }

    async fn unwrap_cached(&self, stored: &StoredDataKey) -> VaultResult<Arc<DataKey>> {
        if let Some(key) = self.cache.get(&stored.key_id) {
            return Ok(key);
        }
        let context = context_of(stored);
        let wrapped = WrappedKey {
            kek_id: stored.kek_id.clone(),
            ciphertext: stored.wrapped.clone(),
        };
        let key = Arc::new(
            self.with_timeout(self.provider.unwrap_data_key(&wrapped, &context))
                .await?,
        );
        self.cache.insert(stored.key_id.clone(), key.clone());
        Ok(key)
    }

    async fn with_timeout<T>(
        &self,
        call: impl std::future::Future<Output = CryptoResult<T>>,
    ) -> CryptoResult<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(CryptoError::Unavailable("key provider timed out".into())))
    }

    /// Re-wraps every data key not yet under the provider's current KEK. Bodies are untouched.
    /// Returns (re-wrapped, already current).
    ///
    /// # Errors
    /// The first failure; keys re-wrapped before it stay re-wrapped (each is one atomic update),
    /// so running it again continues where it stopped.
    pub async fn rewrap_all(&self) -> VaultResult<(usize, usize)> {
        let current = self.provider.current_kek_id();
        let mut rewrapped = 0;
        let mut already = 0;
        for stored in self.store.all_data_keys().await? {
            if stored.kek_id == current {
                already += 1;
                continue;
            }
            let context = context_of(&stored);
            let wrapped = WrappedKey {
                kek_id: stored.kek_id.clone(),
                ciphertext: stored.wrapped.clone(),
            };
            let key = self
                .with_timeout(self.provider.unwrap_data_key(&wrapped, &context))
                .await?;
            let new = self
                .with_timeout(self.provider.wrap_data_key(&key, &context))
                .await?;
            if self
                .store
                .rewrap_data_key(&stored.key_id, &stored.kek_id, &new.kek_id, &new.ciphertext)
                .await?
            {
                rewrapped += 1;
            }
        }
        Ok((rewrapped, already))
    }
}

/// Bodies from this size up are sealed and opened on the blocking pool. AES-GCM runs at roughly
/// 1 GB/s here: a typical resource (2 KB, ~2 µs) is cheaper to seal in place than to hand to
/// another thread (~10 µs), but a multi-megabyte Bundle would hold an async worker for
/// milliseconds.
const OFFLOAD_BYTES: usize = 256 * 1024;

/// A [`RecordBinding`] that owns its strings, to cross into a blocking task.
struct OwnedBinding {
    tenant: String,
    resource_type: String,
    id: String,
    version: i64,
    compartment: Option<String>,
}

impl OwnedBinding {
    fn of(binding: &RecordBinding<'_>) -> Self {
        OwnedBinding {
            tenant: binding.tenant.to_string(),
            resource_type: binding.resource_type.to_string(),
            id: binding.id.to_string(),
            version: binding.version,
            compartment: binding.compartment.map(str::to_string),
        }
    }

    fn borrow(&self) -> RecordBinding<'_> {
        RecordBinding {
            tenant: &self.tenant,
            resource_type: &self.resource_type,
            id: &self.id,
            version: self.version,
            compartment: self.compartment.as_deref(),
        }
    }
}

fn context_of(stored: &StoredDataKey) -> KeyContext {
    KeyContext {
        tenant: stored.tenant.clone(),
        key_id: stored.key_id.clone(),
        compartment: stored.compartment.clone(),
    }
}

/// Logs an integrity alarm (no data, only where) and returns the error.
fn integrity_alarm(record: &VersionRecord, reason: &str) -> VaultError {
    tracing::error!(
        alarm = "integrity",
        resource_type = %record.resource_type,
        id = %record.id,
        version = record.version,
        reason,
        "INTEGRITY ALARM: a stored resource failed to authenticate; it was not served"
    );
    CryptoError::Integrity(reason.to_string()).into()
}
