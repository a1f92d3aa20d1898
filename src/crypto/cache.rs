//! The only place data keys exist in clear: a bounded in-memory cache (maximum entries and
//! maximum age, both configurable). Entries are `Arc<DataKey>`; a `DataKey` wipes its bytes when
//! the last reference drops, so eviction, expiry and invalidation all zeroize.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use serde::Serialize;

use super::DataKey;

/// Plaintext data keys by key id.
pub struct DataKeyCache {
    keys: Cache<String, Arc<DataKey>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters for `custodian keys status` and `/health`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub max_entries: u64,
    pub max_age_secs: u64,
}

impl DataKeyCache {
    /// A cache of at most `max_entries` keys, each kept at most `max_age`.
    pub fn new(max_entries: u64, max_age: Duration) -> Self {
        DataKeyCache {
            keys: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(max_age)
                .build(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The key if cached.
    pub fn get(&self, key_id: &str) -> Option<Arc<DataKey>> {
        let found = self.keys.get(key_id);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches a key.
    pub fn insert(&self, key_id: String, key: Arc<DataKey>) {
        self.keys.insert(key_id, key);
    }

    /// Drops one key (erasure); its bytes are wiped once no request holds it.
    pub fn invalidate(&self, key_id: &str) {
        self.keys.invalidate(key_id);
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        self.keys.run_pending_tasks();
        let policy = self.keys.policy();
        CacheStats {
            entries: self.keys.entry_count(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            max_entries: policy.max_capacity().unwrap_or_default(),
            max_age_secs: policy
                .time_to_live()
                .map(|age| age.as_secs())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    #[test]
    fn bounded_by_entries_and_age() {
        let cache = DataKeyCache::new(2, Duration::from_millis(50));
        for index in 0..10u8 {
            cache.insert(format!("k{index}"), Arc::new(Zeroizing::new([index; 32])));
        }
        assert!(cache.stats().entries <= 2);
        cache.insert("fresh".into(), Arc::new(Zeroizing::new([1; 32])));
        std::thread::sleep(Duration::from_millis(80));
        assert!(cache.get("fresh").is_none(), "expired after max age");
        assert!(cache.stats().misses >= 1);
    }
}
