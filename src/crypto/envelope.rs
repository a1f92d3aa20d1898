//! Sealing one resource version: AES-256-GCM under a per-record subkey.
//!
//! Layout of a sealed body: `[format 1][salt 32][nonce 12][ciphertext + tag 16]`.
//!
//! - The subkey is HKDF-SHA256(data key, salt) with a fresh random salt per record, so no data
//!   key ever encrypts more than one message and the 2^32 random-nonce limit of AES-GCM under one
//!   key never comes into play, however many versions a compartment accumulates.
//! - The additional data binds the ciphertext to its row: tenant, resource type, id, version and
//!   compartment, length-prefixed so that no two bindings encode alike. A ciphertext copied into
//!   another row (or another tenant, version or compartment) fails to authenticate.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CryptoError, CryptoResult, DataKey};

const FORMAT_V1: u8 = 1;
const SALT_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + SALT_LEN + NONCE_LEN;
const SUBKEY_INFO: &[u8] = b"custodian record subkey v1";

/// The row a ciphertext belongs to.
#[derive(Debug, Clone, Copy)]
pub struct RecordBinding<'a> {
    pub tenant: &'a str,
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version: i64,
    /// The compartment pseudonym, `None` outside any compartment.
    pub compartment: Option<&'a str>,
}

impl RecordBinding<'_> {
    /// The additional data: a label, then each field length-prefixed.
    fn additional_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(128);
        aad.extend_from_slice(b"custodian-record-v1");
        for field in [self.tenant, self.resource_type, self.id] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        aad.extend_from_slice(&self.version.to_be_bytes());
        match self.compartment {
            Some(compartment) => {
                aad.push(1);
                aad.extend_from_slice(&(compartment.len() as u32).to_be_bytes());
                aad.extend_from_slice(compartment.as_bytes());
            }
            None => aad.push(0),
        }
        aad
    }
}

fn subkey(data_key: &DataKey, salt: &[u8]) -> CryptoResult<Aes256Gcm> {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(salt), data_key.as_slice())
        .expand(SUBKEY_INFO, okm.as_mut_slice())
        .map_err(|_| CryptoError::Internal("HKDF output length".into()))?;
    Aes256Gcm::new_from_slice(okm.as_slice())
        .map_err(|_| CryptoError::Internal("AES-256 key length".into()))
}

/// Encrypts `plaintext` for the row `binding`.
///
/// # Errors
/// [`CryptoError::Internal`] only on a broken invariant (key sizes).
pub fn seal(
    data_key: &DataKey,
    binding: &RecordBinding<'_>,
    plaintext: &[u8],
) -> CryptoResult<Vec<u8>> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = FORMAT_V1;
    OsRng.fill_bytes(&mut header[1..]);
    let (salt, nonce) = header[1..].split_at(SALT_LEN);
    let cipher = subkey(data_key, salt)?;
    let aad = binding.additional_data();
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Internal("AES-GCM encryption failed".into()))?;
    let mut sealed = Vec::with_capacity(HEADER_LEN + ciphertext.len());
    sealed.extend_from_slice(&header);
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Decrypts a sealed body of the row `binding`.
///
/// # Errors
/// [`CryptoError::Integrity`] when the body is malformed, was sealed for another row, or was
/// altered in any bit.
pub fn open(
    data_key: &DataKey,
    binding: &RecordBinding<'_>,
    sealed: &[u8],
) -> CryptoResult<Vec<u8>> {
    if sealed.len() < HEADER_LEN + TAG_LEN || sealed[0] != FORMAT_V1 {
        return Err(CryptoError::Integrity(
            "sealed body has an unknown format".into(),
        ));
    }
    let (salt, rest) = sealed[1..].split_at(SALT_LEN);
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let cipher = subkey(data_key, salt)?;
    let aad = binding.additional_data();
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Integrity("sealed body does not authenticate for its row".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn binding<'a>(
        tenant: &'a str,
        id: &'a str,
        version: i64,
        compartment: Option<&'a str>,
    ) -> RecordBinding<'a> {
        RecordBinding {
            tenant,
            resource_type: "Patient",
            id,
            version,
            compartment,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip_and_every_bit_flip_fails(
            key in proptest::array::uniform32(any::<u8>()),
            plaintext in proptest::collection::vec(any::<u8>(), 0..512),
            tenant in "[a-z]{1,8}",
            id in "[A-Za-z0-9.-]{1,16}",
            version in 1i64..1000,
            compartment in proptest::option::of("[0-9a-f-]{36}"),
            flip in any::<proptest::sample::Index>(),
        ) {
            let key = Zeroizing::new(key);
            let row = binding(&tenant, &id, version, compartment.as_deref());
            let sealed = seal(&key, &row, &plaintext).unwrap();
            prop_assert_eq!(open(&key, &row, &sealed).unwrap(), plaintext.clone());

            // One flipped bit anywhere (format byte, salt, nonce, ciphertext, tag) fails.
            let mut tampered = sealed.clone();
            let bit = flip.index(tampered.len() * 8);
            tampered[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(open(&key, &row, &tampered).is_err());

            // Any other binding fails: version, id, tenant, compartment.
            prop_assert!(open(&key, &binding(&tenant, &id, version + 1, compartment.as_deref()), &sealed).is_err());
            let other_id = format!("{id}x");
            prop_assert!(open(&key, &binding(&tenant, &other_id, version, compartment.as_deref()), &sealed).is_err());
            let other_tenant = format!("{tenant}x");
            prop_assert!(open(&key, &binding(&other_tenant, &id, version, compartment.as_deref()), &sealed).is_err());
            let other_compartment = match &compartment { Some(_) => None, None => Some("c") };
            prop_assert!(open(&key, &binding(&tenant, &id, version, other_compartment), &sealed).is_err());

            // Another key fails.
            let mut other_key = key.clone();
            other_key[0] ^= 1;
            prop_assert!(open(&other_key, &row, &sealed).is_err());
        }
    }

    /// Cost of sealing and opening (not a pass/fail test): run with
    /// `cargo test --release --lib measure_envelope_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_envelope_cost() {
        let key = Zeroizing::new([7u8; 32]);
        let row = binding(
            "tenant",
            "Patient",
            3,
            Some("c5a7e0a4-6f0e-4d57-9d3b-0f4c1b7f7a21"),
        );
        for size in [2 * 1024, 64 * 1024, 4 * 1024 * 1024] {
            let body = vec![b'x'; size];
            let rounds = (64 * 1024 * 1024 / size).clamp(8, 20_000);
            let start = std::time::Instant::now();
            let mut sealed = Vec::new();
            for _ in 0..rounds {
                sealed = seal(&key, &row, &body).unwrap();
            }
            let seal_cost = start.elapsed() / rounds as u32;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                open(&key, &row, &sealed).unwrap();
            }
            let open_cost = start.elapsed() / rounds as u32;
            println!("{size:>8} bytes: seal {seal_cost:?}, open {open_cost:?}");
        }
    }

    #[test]
    fn two_seals_of_the_same_body_differ() {
        let key = Zeroizing::new([7u8; 32]);
        let row = binding("t", "p", 1, None);
        assert_ne!(
            seal(&key, &row, b"same").unwrap(),
            seal(&key, &row, b"same").unwrap()
        );
    }

    #[test]
    fn truncated_or_unknown_format_is_an_integrity_failure() {
        let key = Zeroizing::new([7u8; 32]);
        let row = binding("t", "p", 1, None);
        let sealed = seal(&key, &row, b"body").unwrap();
        assert!(matches!(
            open(&key, &row, &sealed[..20]),
            Err(CryptoError::Integrity(_))
        ));
        let mut future = sealed.clone();
        future[0] = 2;
        assert!(matches!(
            open(&key, &row, &future),
            Err(CryptoError::Integrity(_))
        ));
    }
}
