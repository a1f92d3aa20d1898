//! The `local` key provider: key-encryption keys in files, for development and the embedded
//! default. Each KEK version is its own file `local-kek-v{N}.key` (32 random bytes, base64) in
//! the key directory, created with mode 0600; the highest version wraps new data keys. Rotation
//! adds a version; once every data key is re-wrapped, the old file can be deleted.
//!
//! A data key is wrapped with AES-256-GCM under the KEK, its additional data holding the KEK id
//! and the key context, so a wrapped key unwraps only for the compartment it was made for.
//!
//! Not for production: the KEK sits beside the data it protects. Use `aws` there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine;
use zeroize::Zeroizing;

use super::{CryptoError, CryptoResult, DataKey, KeyContext, KeyProvider, WrappedKey};

const FILE_PREFIX: &str = "local-kek-v";
const FILE_SUFFIX: &str = ".key";
const NONCE_LEN: usize = 12;

/// KEKs loaded from a directory.
pub struct LocalKeyProvider {
    keks: BTreeMap<u32, Zeroizing<[u8; 32]>>,
    current: u32,
}

fn kek_id(version: u32) -> String {
    format!("local:{version}")
}

fn kek_file(directory: &Path, version: u32) -> PathBuf {
    directory.join(format!("{FILE_PREFIX}{version}{FILE_SUFFIX}"))
}

impl LocalKeyProvider {
    /// Loads every KEK version in `directory`, creating version 1 when there is none.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] when a key file is unreadable, malformed, or readable by other
    /// users (a KEK others can read protects nothing).
    pub fn load_or_create(directory: &Path) -> CryptoResult<Self> {
        let mut keks = read_keks(directory)?;
        if keks.is_empty() {
            create_kek(directory, 1)?;
            keks = read_keks(directory)?;
        }
        let current = *keks
            .keys()
            .next_back()
            .ok_or_else(|| CryptoError::Internal("no local KEK".into()))?;
        tracing::warn!(
            kek = %kek_id(current),
            "the local key provider keeps its key-encryption key in a file: for development only"
        );
        Ok(LocalKeyProvider { keks, current })
    }

    /// Creates the next KEK version in `directory` and returns its id; the provider must be
    /// loaded again to use it.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] when the file cannot be written.
    pub fn add_version(directory: &Path) -> CryptoResult<String> {
        let next = read_keks(directory)?
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            + 1;
        create_kek(directory, next)?;
        Ok(kek_id(next))
    }

    /// Deletes a KEK version's file. The caller checks first that no data key still uses it.
    ///
    /// # Errors
    /// [`CryptoError::Internal`] for an unknown id, the current version, or an I/O failure.
    pub fn retire(directory: &Path, kek: &str) -> CryptoResult<()> {
        let version = parse_kek_id(kek)?;
        let newest = read_keks(directory)?.keys().next_back().copied();
        if newest == Some(version) {
            return Err(CryptoError::Internal(format!("{kek} is the current KEK")));
        }
        std::fs::remove_file(kek_file(directory, version))
            .map_err(|error| CryptoError::Internal(format!("cannot remove {kek}: {error}")))
    }

    fn cipher(&self, version: u32) -> CryptoResult<Aes256Gcm> {
        let kek = self.keks.get(&version).ok_or_else(|| {
            CryptoError::Internal(format!("{} is not available (retired?)", kek_id(version)))
        })?;
        Aes256Gcm::new_from_slice(kek.as_slice())
            .map_err(|_| CryptoError::Internal("KEK length".into()))
    }
}

fn parse_kek_id(kek: &str) -> CryptoResult<u32> {
    kek.strip_prefix("local:")
        .and_then(|version| version.parse().ok())
        .ok_or_else(|| CryptoError::Internal(format!("{kek} is not a local KEK id")))
}

fn additional_data(kek: &str, context: &KeyContext) -> Vec<u8> {
    let mut aad = kek.as_bytes().to_vec();
    for (name, value) in context.pairs() {
        aad.push(0);
        aad.extend_from_slice(name.as_bytes());
        aad.push(b'=');
        aad.extend_from_slice(value.as_bytes());
    }
    aad
}

fn read_keks(directory: &Path) -> CryptoResult<BTreeMap<u32, Zeroizing<[u8; 32]>>> {
    let mut keks = BTreeMap::new();
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(keks),
        Err(error) => {
            return Err(CryptoError::Internal(format!(
                "cannot read the key directory: {error}"
            )))
        }
    };
    for entry in entries {
        let path = entry
            .map_err(|error| {
                CryptoError::Internal(format!("cannot read the key directory: {error}"))
            })?
            .path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let Some(version) = name
            .strip_prefix(FILE_PREFIX)
            .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
            .and_then(|version| version.parse::<u32>().ok())
        else {
            continue;
        };
        refuse_if_shared(&path)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|error| CryptoError::Internal(format!("cannot read {name}: {error}")))?,
        );
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| CryptoError::Internal(format!("{name} is not base64")))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Internal(format!("{name} does not hold 32 bytes")))?;
        keks.insert(version, Zeroizing::new(key));
    }
    Ok(keks)
}

#[cfg(unix)]
fn refuse_if_shared(path: &Path) -> CryptoResult<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|error| CryptoError::Internal(format!("cannot stat a KEK file: {error}")))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CryptoError::Internal(format!(
            "{} is accessible to other users (mode {:o}); make it 0600",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_if_shared(_path: &Path) -> CryptoResult<()> {
    Ok(())
}

fn create_kek(directory: &Path, version: u32) -> CryptoResult<()> {
    use std::io::Write;
    std::fs::create_dir_all(directory).map_err(|error| {
        CryptoError::Internal(format!("cannot create the key directory: {error}"))
    })?;
    let mut key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(key.as_mut_slice());
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_slice()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let path = kek_file(directory, version);
    let mut file = options.open(&path).map_err(|error| {
        CryptoError::Internal(format!("cannot create {}: {error}", path.display()))
    })?;
    file.write_all(encoded.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|error| {
            CryptoError::Internal(format!("cannot write {}: {error}", path.display()))
        })?;
    tracing::info!(kek = %kek_id(version), "created a local key-encryption key");
    Ok(())
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn current_kek_id(&self) -> String {
        kek_id(self.current)
    }

    async fn generate_data_key(&self, context: &KeyContext) -> CryptoResult<(DataKey, WrappedKey)> {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut_slice());
        let wrapped = self.wrap_data_key(&key, context).await?;
        Ok((key, wrapped))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        context: &KeyContext,
    ) -> CryptoResult<DataKey> {
        let version = parse_kek_id(&wrapped.kek_id)?;
        let cipher = self.cipher(version)?;
        if wrapped.ciphertext.len() < NONCE_LEN {
            return Err(CryptoError::Integrity(
                "wrapped data key is truncated".into(),
            ));
        }
        let (nonce, ciphertext) = wrapped.ciphertext.split_at(NONCE_LEN);
        let aad = additional_data(&wrapped.kek_id, context);
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    CryptoError::Integrity("wrapped data key does not authenticate".into())
                })?,
        );
        let key: [u8; 32] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Integrity("wrapped data key has the wrong length".into()))?;
        Ok(Zeroizing::new(key))
    }

    async fn wrap_data_key(&self, key: &DataKey, context: &KeyContext) -> CryptoResult<WrappedKey> {
        let kek = self.current_kek_id();
        let cipher = self.cipher(self.current)?;
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = additional_data(&kek, context);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.as_slice(),
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Internal("AES-GCM wrap failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ciphertext);
        Ok(WrappedKey {
            kek_id: kek,
            ciphertext: wrapped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(compartment: Option<&str>) -> KeyContext {
        KeyContext {
            tenant: "t".into(),
            key_id: "k1".into(),
            compartment: compartment.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn wraps_for_one_context_rotates_and_retires() {
        let directory =
            std::env::temp_dir().join(format!("custodian-kek-{}", uuid::Uuid::new_v4()));
        let provider = LocalKeyProvider::load_or_create(&directory).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kek_file(&directory, 1))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (key, wrapped) = provider
            .generate_data_key(&context(Some("c1")))
            .await
            .unwrap();
        assert_eq!(wrapped.kek_id, "local:1");
        assert_eq!(
            *provider
                .unwrap_data_key(&wrapped, &context(Some("c1")))
                .await
                .unwrap(),
            *key
        );
        assert!(matches!(
            provider
                .unwrap_data_key(&wrapped, &context(Some("c2")))
                .await,
            Err(CryptoError::Integrity(_))
        ));

        // Rotation: a new version wraps; the old one still unwraps until it is retired.
        assert_eq!(
            LocalKeyProvider::add_version(&directory).unwrap(),
            "local:2"
        );
        let rotated = LocalKeyProvider::load_or_create(&directory).unwrap();
        let rewrapped = rotated
            .wrap_data_key(&key, &context(Some("c1")))
            .await
            .unwrap();
        assert_eq!(rewrapped.kek_id, "local:2");
        assert!(
            LocalKeyProvider::retire(&directory, "local:2").is_err(),
            "current is kept"
        );
        LocalKeyProvider::retire(&directory, "local:1").unwrap();
        let retired = LocalKeyProvider::load_or_create(&directory).unwrap();
        assert_eq!(
            *retired
                .unwrap_data_key(&rewrapped, &context(Some("c1")))
                .await
                .unwrap(),
            *key
        );
        assert!(retired
            .unwrap_data_key(&wrapped, &context(Some("c1")))
            .await
            .is_err());

        // A KEK file others can read is refused.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                kek_file(&directory, 2),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap();
            assert!(LocalKeyProvider::load_or_create(&directory).is_err());
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
