//! FHIR search (http://hl7.org/fhir/R4/search.html) over encrypted resources.
//!
//! The parameters are the official R4 SearchParameter definitions ([`registry`]), evaluated from
//! their FHIRPath expressions ([`fhirpath`], [`values`]). Writes maintain an index
//! ([`index`]) in the same transaction as the version: codes, references and other
//! non-identifying values in clear, identifying ones as keyed blind indexes. A search
//! ([`engine`]) parses the query ([`query`]), narrows candidates with the index, then decrypts
//! every candidate, applies the access decision and re-checks every criterion on the resource
//! ([`matcher`]) — so results are exact even where the index is coarse (blinded prefixes, year
//! buckets, truncated hashes) — and pages, sorts and includes on what remains. A database
//! indexed by another build's rules is re-indexed before it is searched ([`reindex`]).

pub mod engine;
pub mod fhirpath;
pub mod index;
pub mod matcher;
pub mod query;
pub mod registry;
pub mod reindex;
pub mod values;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::crypto::vault::{Vault, VaultResult};
use crate::store::{IndexRows, Scope};
use index::Blinder;
use registry::Registry;

/// The HKDF purpose of the index key (changing it re-keys every blind index).
const INDEX_KEY_PURPOSE: &str = "custodian/search-index/v1";

/// The search service shared by all requests: the parameters and each tenant's blinder.
pub struct Search {
    pub registry: Registry,
    vault: Arc<Vault>,
    blinders: RwLock<HashMap<String, Arc<Blinder>>>,
}

impl Search {
    /// A search service over `registry`, blinding with keys derived through `vault`.
    pub fn new(registry: Registry, vault: Arc<Vault>) -> Search {
        Search {
            registry,
            vault,
            blinders: RwLock::new(HashMap::new()),
        }
    }

    /// The blinder of the scope's tenant.
    ///
    /// # Errors
    /// 503-class when the tenant's key cannot be fetched.
    pub async fn blinder(&self, scope: &Scope) -> VaultResult<Arc<Blinder>> {
        if let Some(blinder) = self
            .blinders
            .read()
            .ok()
            .and_then(|blinders| blinders.get(scope.tenant()).cloned())
        {
            return Ok(blinder);
        }
        let key = self.vault.derived_key(scope, INDEX_KEY_PURPOSE).await?;
        let blinder = Arc::new(Blinder::new(key.as_slice()));
        if let Ok(mut blinders) = self.blinders.write() {
            blinders.insert(scope.tenant().to_string(), blinder.clone());
        }
        Ok(blinder)
    }

    /// The index rows of a resource about to be written.
    ///
    /// # Errors
    /// 503-class when the tenant's index key cannot be fetched.
    pub async fn index_rows(
        &self,
        scope: &Scope,
        resource_type: &str,
        resource: &Value,
    ) -> VaultResult<IndexRows> {
        let blinder = self.blinder(scope).await?;
        Ok(index::index_rows(
            &self.registry,
            &blinder,
            resource_type,
            resource,
        ))
    }
}
