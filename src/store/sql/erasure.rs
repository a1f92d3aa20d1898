//! The SQL of erasure (`Patient/$erase`), legal holds and the `$everything` compartment pages,
//! on both backends.
//!
//! Erasure is one transaction whose first statement deletes the compartment's data key rows.
//! On PostgreSQL that statement waits for every write still holding the key (writes lock the
//! data key rows they seal under, `FOR KEY SHARE`, see [`SqlStore::lock_data_keys`]); once it has
//! them, a write that comes later finds the key gone and fails, so no row sealed under an erased
//! key can be committed behind the erasure's back. The later statements then see every row
//! written before. SQLite runs one writer at a time, which gives the same order.

use sqlx::Row;

use super::{append_audit_in, bind_all, Bind, Binds, MAX_LIST_BINDS, VERSION_COLUMNS};
use super::{classify, decode, from_micros, micros, placeholders, Backend, SqlStore, INDEX_TABLES};
use crate::store::{
    CompartmentQuery, ErasureOutcome, ErasureRequest, LegalHold, Scope, StoreError, StoreResult,
    Tombstone, VersionRecord,
};

impl SqlStore {
    /// Locks the data key rows a write seals under until its transaction ends (PostgreSQL:
    /// `FOR KEY SHARE`, so that an erasure's delete waits for it, while concurrent writes and a
    /// rotation's re-wrap, which changes no key column, do not wait for each other), and checks
    /// that they still exist.
    ///
    /// # Errors
    /// [`StoreError::VersionConflict`] when a key is gone (its compartment was erased since the
    /// write looked it up): the caller retries, and the retry resolves the compartment afresh.
    pub(super) async fn lock_data_keys(
        &self,
        transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
        tenant: &str,
        key_ids: &[&str],
    ) -> StoreResult<()> {
        let mut wanted: Vec<&str> = key_ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        for chunk in wanted.chunks(MAX_LIST_BINDS) {
            let lock = match self.backend {
                Backend::Postgres => " FOR KEY SHARE",
                Backend::Sqlite => "",
            };
            let statement = format!(
                "SELECT key_id FROM data_keys WHERE tenant = $1 AND key_id IN ({}){lock}",
                placeholders(2, chunk.len())
            );
            let mut query = sqlx::query(&statement).bind(tenant);
            for key_id in chunk {
                query = query.bind(*key_id);
            }
            let found = query
                .fetch_all(&mut **transaction)
                .await
                .map_err(classify)?;
            if found.len() != chunk.len() {
                return Err(StoreError::VersionConflict);
            }
        }
        Ok(())
    }

    pub(super) async fn compartment_page_now(
        &self,
        scope: &Scope,
        query: &CompartmentQuery,
    ) -> StoreResult<Vec<VersionRecord>> {
        let mut binds = Binds::default();
        let tenant = binds.text(scope.tenant());
        // `v.tenant` stated for SQLite's sake (see current_in_compartment).
        let mut conditions = vec![
            format!("h.tenant = {tenant}"),
            "h.deleted = 0".to_string(),
            format!("v.tenant = {tenant}"),
            format!("v.compartment = {}", binds.text(&query.compartment)),
        ];
        if !query.resource_types.is_empty() {
            let types: Vec<String> = query
                .resource_types
                .iter()
                .map(|name| binds.text(name))
                .collect();
            conditions.push(format!("v.resource_type IN ({})", types.join(", ")));
        }
        if let Some(since) = query.since {
            let since = binds.push(Bind::Integer(micros(since)));
            conditions.push(format!("v.last_updated_us >= {since}"));
        }
        if let Some((after_type, after_id)) = &query.after {
            let (after_type, after_id) = (binds.text(after_type), binds.text(after_id));
            conditions.push(format!(
                "(v.resource_type > {after_type} OR (v.resource_type = {after_type} AND v.resource_id > {after_id}))"
            ));
        }
        let limit = binds.push(Bind::Integer(
            i64::try_from(query.limit).unwrap_or(i64::MAX),
        ));
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM resource_versions v \
             JOIN resource_heads h ON h.tenant = v.tenant AND h.resource_type = v.resource_type \
              AND h.resource_id = v.resource_id AND h.version_id = v.version_id \
             WHERE {} ORDER BY v.resource_type, v.resource_id LIMIT {limit}",
            conditions.join(" AND ")
        );
        let rows = bind_all(sqlx::query(&statement), binds.0)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        rows.iter().map(decode).collect()
    }

    pub(super) async fn erase_now(
        &self,
        scope: &Scope,
        request: &ErasureRequest,
    ) -> StoreResult<ErasureOutcome> {
        let tenant = scope.tenant();
        let pseudonym = request.pseudonym.as_str();
        let (mut transaction, _turn) = self.begin().await?;
        if request.respect_holds {
            if let Some(hold) = hold_on(&mut *transaction, tenant, pseudonym).await? {
                transaction.rollback().await.map_err(classify)?;
                return Ok(ErasureOutcome::Held(hold));
            }
        }
        // First, the keys: crypto-shredding, and (PostgreSQL) the wait for writes holding them.
        let key_rows = sqlx::query(
            "DELETE FROM data_keys WHERE tenant = $1 AND compartment = $2 RETURNING key_id",
        )
        .bind(tenant)
        .bind(pseudonym)
        .fetch_all(&mut *transaction)
        .await
        .map_err(classify)?;
        let mut key_ids = key_rows
            .iter()
            .map(|row| row.try_get::<String, _>("key_id"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| StoreError::Internal(error.to_string()))?;
        // Resources with a version in the compartment, and the compartment of their current
        // version: a resource that moved to another patient since keeps its head there.
        let touched = sqlx::query(
            "SELECT h.resource_type, h.resource_id, cur.compartment FROM resource_heads h \
             JOIN resource_versions cur ON cur.tenant = h.tenant \
              AND cur.resource_type = h.resource_type AND cur.resource_id = h.resource_id \
              AND cur.version_id = h.version_id \
             WHERE h.tenant = $1 AND (h.resource_type, h.resource_id) IN \
               (SELECT p.resource_type, p.resource_id FROM resource_versions p \
                WHERE p.tenant = $1 AND p.compartment = $2)",
        )
        .bind(tenant)
        .bind(pseudonym)
        .fetch_all(&mut *transaction)
        .await
        .map_err(classify)?;
        let mut whole: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for row in &touched {
            let get = |error: sqlx::Error| StoreError::Internal(error.to_string());
            let current: Option<String> = row.try_get("compartment").map_err(get)?;
            if current.as_deref().is_some_and(|other| other != pseudonym) {
                continue;
            }
            let resource_type: String = row.try_get("resource_type").map_err(get)?;
            let id: String = row.try_get("resource_id").map_err(get)?;
            whole.entry(resource_type).or_default().push(id);
        }
        let mut resources_erased = 0i64;
        for (resource_type, ids) in &whole {
            resources_erased += ids.len() as i64;
            for chunk in ids.chunks(MAX_LIST_BINDS) {
                let list = placeholders(3, chunk.len());
                let tables = INDEX_TABLES
                    .iter()
                    .copied()
                    .chain(["resource_versions", "resource_heads"]);
                for table in tables {
                    let statement = format!(
                        "DELETE FROM {table} WHERE tenant = $1 AND resource_type = $2 \
                         AND resource_id IN ({list})"
                    );
                    let mut query = sqlx::query(&statement).bind(tenant).bind(resource_type);
                    for id in chunk {
                        query = query.bind(id.as_str());
                    }
                    query.execute(&mut *transaction).await.map_err(classify)?;
                }
            }
        }
        // Older versions sealed in the compartment of resources that now live elsewhere.
        let stray =
            sqlx::query("DELETE FROM resource_versions WHERE tenant = $1 AND compartment = $2")
                .bind(tenant)
                .bind(pseudonym)
                .execute(&mut *transaction)
                .await
                .map_err(classify)?;
        // Bulk export outputs sealed under the destroyed key: unreadable now, and gone.
        sqlx::query("DELETE FROM export_chunks WHERE tenant = $1 AND compartment = $2")
            .bind(tenant)
            .bind(pseudonym)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        let mapping =
            sqlx::query("DELETE FROM patient_compartments WHERE tenant = $1 AND pseudonym = $2")
                .bind(tenant)
                .bind(pseudonym)
                .execute(&mut *transaction)
                .await
                .map_err(classify)?;
        sqlx::query("DELETE FROM legal_holds WHERE tenant = $1 AND pseudonym = $2")
            .bind(tenant)
            .bind(pseudonym)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        let erased_us = micros(request.erased_at);
        let inserted = sqlx::query(
            "INSERT INTO erasures (tenant, pseudonym, key_ids, resources_erased, erased_us) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, pseudonym) DO NOTHING",
        )
        .bind(tenant)
        .bind(pseudonym)
        .bind(key_ids.join(","))
        .bind(resources_erased)
        .bind(erased_us)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
        let changed = !key_ids.is_empty()
            || !touched.is_empty()
            || stray.rows_affected() > 0
            || mapping.rows_affected() > 0
            || inserted.rows_affected() > 0;
        if changed {
            if let Some(audit) = &request.audit {
                append_audit_in(&mut transaction, std::slice::from_ref(audit))
                    .await
                    .map_err(|error| {
                        StoreError::Unavailable(format!("audit append failed: {error}"))
                    })?;
            }
        }
        let row = sqlx::query(
            "SELECT erasure_id, tenant, pseudonym, key_ids, resources_erased, erased_us \
             FROM erasures WHERE tenant = $1 AND pseudonym = $2",
        )
        .bind(tenant)
        .bind(pseudonym)
        .fetch_one(&mut *transaction)
        .await
        .map_err(classify)?;
        transaction.commit().await.map_err(classify)?;
        let mut tombstone = decode_tombstone(&row)?;
        // A re-applied erasure also names the keys it destroyed this time.
        key_ids.retain(|key_id| !tombstone.key_ids.contains(key_id));
        tombstone.key_ids.extend(key_ids);
        if self.backend == Backend::Sqlite && changed {
            self.scrub_sqlite().await;
        }
        Ok(ErasureOutcome::Erased { tombstone, changed })
    }

    /// Moves the WAL into the database file and truncates it, so that the erased rows' old page
    /// images leave the `-wal` file too (`secure_delete` zeroes them in the database file). A
    /// busy reader can make this a no-op; the next erasure or SQLite's own checkpoints follow
    /// up, and the data is unreadable anyway without its key.
    async fn scrub_sqlite(&self) {
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::warn!(%error, "WAL checkpoint after erasure failed");
        }
    }

    pub(super) async fn erasures_after_now(&self, after_id: i64) -> StoreResult<Vec<Tombstone>> {
        let rows = sqlx::query(
            "SELECT erasure_id, tenant, pseudonym, key_ids, resources_erased, erased_us \
             FROM erasures WHERE erasure_id > $1 ORDER BY erasure_id",
        )
        .bind(after_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_tombstone).collect()
    }

    pub(super) async fn legal_hold_now(
        &self,
        scope: &Scope,
        pseudonym: &str,
    ) -> StoreResult<Option<LegalHold>> {
        hold_on(&self.pool, scope.tenant(), pseudonym).await
    }

    pub(super) async fn place_hold_now(&self, scope: &Scope, hold: &LegalHold) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO legal_holds (tenant, pseudonym, case_reference, placed_us) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, pseudonym) DO NOTHING",
        )
        .bind(scope.tenant())
        .bind(hold.pseudonym.as_str())
        .bind(hold.case_reference.as_str())
        .bind(hold.placed_us)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    pub(super) async fn release_hold_now(
        &self,
        scope: &Scope,
        pseudonym: &str,
    ) -> StoreResult<bool> {
        let released = sqlx::query("DELETE FROM legal_holds WHERE tenant = $1 AND pseudonym = $2")
            .bind(scope.tenant())
            .bind(pseudonym)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(released.rows_affected() > 0)
    }

    pub(super) async fn legal_holds_now(&self, scope: &Scope) -> StoreResult<Vec<LegalHold>> {
        let rows = sqlx::query(
            "SELECT pseudonym, case_reference, placed_us FROM legal_holds WHERE tenant = $1 \
             ORDER BY placed_us",
        )
        .bind(scope.tenant())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(decode_hold).collect()
    }
}

/// The legal hold of a compartment, on a connection or inside a transaction.
async fn hold_on<'e>(
    executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
    tenant: &str,
    pseudonym: &str,
) -> StoreResult<Option<LegalHold>> {
    let row = sqlx::query(
        "SELECT pseudonym, case_reference, placed_us FROM legal_holds \
         WHERE tenant = $1 AND pseudonym = $2",
    )
    .bind(tenant)
    .bind(pseudonym)
    .fetch_optional(executor)
    .await
    .map_err(classify)?;
    row.as_ref().map(decode_hold).transpose()
}

fn decode_hold(row: &sqlx::any::AnyRow) -> StoreResult<LegalHold> {
    let get = |error: sqlx::Error| StoreError::Internal(format!("bad legal hold row: {error}"));
    Ok(LegalHold {
        pseudonym: row.try_get("pseudonym").map_err(get)?,
        case_reference: row.try_get("case_reference").map_err(get)?,
        placed_us: row.try_get("placed_us").map_err(get)?,
    })
}

fn decode_tombstone(row: &sqlx::any::AnyRow) -> StoreResult<Tombstone> {
    let get = |error: sqlx::Error| StoreError::Internal(format!("bad erasure row: {error}"));
    let key_ids: String = row.try_get("key_ids").map_err(get)?;
    let erased_us: i64 = row.try_get("erased_us").map_err(get)?;
    // Only checks that the stored time is representable.
    from_micros(erased_us)?;
    Ok(Tombstone {
        erasure_id: row.try_get("erasure_id").map_err(get)?,
        tenant: row.try_get("tenant").map_err(get)?,
        pseudonym: row.try_get("pseudonym").map_err(get)?,
        key_ids: key_ids
            .split(',')
            .filter(|key_id| !key_id.is_empty())
            .map(str::to_string)
            .collect(),
        resources_erased: row.try_get("resources_erased").map_err(get)?,
        erased_us,
    })
}
