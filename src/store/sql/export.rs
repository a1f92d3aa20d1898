//! The Bulk Data export tables (`migrations/*/0008_export.sql`): jobs with a lease, and their
//! sealed output chunks. The lease is the one guard against two nodes running one job: every
//! write of a worker is conditional on still holding it, in the same transaction.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{classify, detached, internal, SqlStore};
use crate::store::{ExportChunk, ExportJobRow, ExportLease, StoreResult};

const JOB_COLUMNS: &str = "tenant, job_id, status, requester, spec, spec_key_id, transaction_us, \
     expires_us, lease_owner, lease_until_us, attempts, exported, error";

/// The condition under which a worker still holds a lease (binds `$1` tenant, `$2` job, `$3`
/// owner).
const LEASE_HELD: &str = "tenant = $1 AND job_id = $2 AND lease_owner = $3 AND status = 'running'";

fn decode_job(row: &AnyRow) -> StoreResult<ExportJobRow> {
    Ok(ExportJobRow {
        tenant: row.try_get("tenant").map_err(internal)?,
        job_id: row.try_get("job_id").map_err(internal)?,
        status: row.try_get("status").map_err(internal)?,
        requester: row.try_get("requester").map_err(internal)?,
        spec: row.try_get("spec").map_err(internal)?,
        spec_key_id: row.try_get("spec_key_id").map_err(internal)?,
        transaction_us: row.try_get("transaction_us").map_err(internal)?,
        expires_us: row.try_get("expires_us").map_err(internal)?,
        lease_owner: row.try_get("lease_owner").map_err(internal)?,
        lease_until_us: row.try_get("lease_until_us").map_err(internal)?,
        attempts: row.try_get("attempts").map_err(internal)?,
        exported: row.try_get("exported").map_err(internal)?,
        error: row.try_get("error").map_err(internal)?,
    })
}

fn decode_chunk(row: &AnyRow) -> StoreResult<ExportChunk> {
    Ok(ExportChunk {
        chunk_no: row.try_get("chunk_no").map_err(internal)?,
        resource_type: row.try_get("resource_type").map_err(internal)?,
        compartment: row.try_get("compartment").map_err(internal)?,
        key_id: row.try_get("key_id").map_err(internal)?,
        line_count: row.try_get("line_count").map_err(internal)?,
        body: row.try_get("body").map_err(internal)?,
    })
}

pub(super) async fn insert_job(store: &SqlStore, job: &ExportJobRow) -> StoreResult<()> {
    sqlx::query(&format!(
        "INSERT INTO export_jobs ({JOB_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    ))
    .bind(&job.tenant)
    .bind(&job.job_id)
    .bind(&job.status)
    .bind(&job.requester)
    .bind(&job.spec)
    .bind(&job.spec_key_id)
    .bind(job.transaction_us)
    .bind(job.expires_us)
    .bind(&job.lease_owner)
    .bind(job.lease_until_us)
    .bind(job.attempts)
    .bind(job.exported)
    .bind(&job.error)
    .execute(&store.pool)
    .await
    .map_err(classify)?;
    Ok(())
}

pub(super) async fn job(
    store: &SqlStore,
    tenant: &str,
    job_id: &str,
) -> StoreResult<Option<ExportJobRow>> {
    let row = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM export_jobs WHERE tenant = $1 AND job_id = $2"
    ))
    .bind(tenant)
    .bind(job_id)
    .fetch_optional(&store.pool)
    .await
    .map_err(classify)?;
    row.as_ref().map(decode_job).transpose()
}

pub(super) async fn claim_job(
    store: &SqlStore,
    lease: &ExportLease,
    now_us: i64,
) -> StoreResult<Option<ExportJobRow>> {
    let store = store.clone();
    let lease = lease.clone();
    detached(async move {
        let candidate = sqlx::query(
            "SELECT job_id, status FROM export_jobs WHERE tenant = $1 \
              AND (status = 'queued' OR (status = 'running' AND lease_until_us < $2)) \
             ORDER BY transaction_us LIMIT 1",
        )
        .bind(&lease.tenant)
        .bind(now_us)
        .fetch_optional(&store.pool)
        .await
        .map_err(classify)?;
        let Some(candidate) = candidate else {
            return Ok(None);
        };
        let job_id: String = candidate.try_get("job_id").map_err(internal)?;
        let (mut transaction, _turn) = store.begin().await?;
        // Conditional on the state just read: of two nodes racing, one update matches.
        let taken = sqlx::query(
            "UPDATE export_jobs SET status = 'running', lease_owner = $3, lease_until_us = $4, \
              attempts = attempts + 1, exported = 0 \
             WHERE tenant = $1 AND job_id = $2 \
              AND (status = 'queued' OR (status = 'running' AND lease_until_us < $5))",
        )
        .bind(&lease.tenant)
        .bind(&job_id)
        .bind(&lease.owner)
        .bind(lease.until_us)
        .bind(now_us)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
        if taken.rows_affected() != 1 {
            transaction.rollback().await.map_err(classify)?;
            return Ok(None);
        }
        // A job taken over from a stopped node restarts from scratch.
        sqlx::query("DELETE FROM export_chunks WHERE tenant = $1 AND job_id = $2")
            .bind(&lease.tenant)
            .bind(&job_id)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM export_jobs WHERE tenant = $1 AND job_id = $2"
        ))
        .bind(&lease.tenant)
        .bind(&job_id)
        .fetch_one(&mut *transaction)
        .await
        .map_err(classify)?;
        transaction.commit().await.map_err(classify)?;
        decode_job(&row).map(Some)
    })
    .await
}

pub(super) async fn append_chunks(
    store: &SqlStore,
    lease: &ExportLease,
    chunks: &[ExportChunk],
) -> StoreResult<bool> {
    let store = store.clone();
    let lease = lease.clone();
    let chunks = chunks.to_vec();
    detached(async move {
        let (mut transaction, _turn) = store.begin().await?;
        // The lease row first: it locks the job, so a cancel (which deletes the job, then its
        // chunks) either waits for this batch or makes it match nothing.
        let lines: i64 = chunks.iter().map(|chunk| chunk.line_count).sum();
        let renewed = sqlx::query(&format!(
            "UPDATE export_jobs SET lease_until_us = $4, exported = exported + $5 WHERE {LEASE_HELD}"
        ))
        .bind(&lease.tenant)
        .bind(&lease.job_id)
        .bind(&lease.owner)
        .bind(lease.until_us)
        .bind(lines)
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
        if renewed.rows_affected() != 1 {
            transaction.rollback().await.map_err(classify)?;
            return Ok(false);
        }
        for chunk in &chunks {
            sqlx::query(
                "INSERT INTO export_chunks (tenant, job_id, chunk_no, resource_type, compartment, \
                  key_id, line_count, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&lease.tenant)
            .bind(&lease.job_id)
            .bind(chunk.chunk_no)
            .bind(&chunk.resource_type)
            .bind(&chunk.compartment)
            .bind(&chunk.key_id)
            .bind(chunk.line_count)
            .bind(&chunk.body)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        }
        transaction.commit().await.map_err(classify)?;
        Ok(true)
    })
    .await
}

pub(super) async fn finish_job(
    store: &SqlStore,
    lease: &ExportLease,
    status: &str,
    error: Option<&str>,
    expires_us: i64,
) -> StoreResult<bool> {
    let finished = sqlx::query(&format!(
        "UPDATE export_jobs SET status = $4, error = $5, expires_us = $6, lease_owner = NULL, \
          lease_until_us = NULL WHERE {LEASE_HELD}"
    ))
    .bind(&lease.tenant)
    .bind(&lease.job_id)
    .bind(&lease.owner)
    .bind(status)
    .bind(error)
    .bind(expires_us)
    .execute(&store.pool)
    .await
    .map_err(classify)?;
    Ok(finished.rows_affected() == 1)
}

pub(super) async fn outputs(
    store: &SqlStore,
    tenant: &str,
    job_id: &str,
) -> StoreResult<Vec<(String, i64)>> {
    let rows = sqlx::query(
        "SELECT resource_type, CAST(SUM(line_count) AS BIGINT) AS lines FROM export_chunks \
         WHERE tenant = $1 AND job_id = $2 GROUP BY resource_type ORDER BY resource_type",
    )
    .bind(tenant)
    .bind(job_id)
    .fetch_all(&store.pool)
    .await
    .map_err(classify)?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("resource_type").map_err(internal)?,
                row.try_get("lines").map_err(internal)?,
            ))
        })
        .collect()
}

pub(super) async fn chunks(
    store: &SqlStore,
    tenant: &str,
    job_id: &str,
    resource_type: &str,
    after_chunk: i64,
    limit: usize,
) -> StoreResult<Vec<ExportChunk>> {
    let rows = sqlx::query(
        "SELECT chunk_no, resource_type, compartment, key_id, line_count, body FROM export_chunks \
         WHERE tenant = $1 AND job_id = $2 AND resource_type = $3 AND chunk_no > $4 \
         ORDER BY chunk_no LIMIT $5",
    )
    .bind(tenant)
    .bind(job_id)
    .bind(resource_type)
    .bind(after_chunk)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&store.pool)
    .await
    .map_err(classify)?;
    rows.iter().map(decode_chunk).collect()
}

pub(super) async fn delete_job(store: &SqlStore, tenant: &str, job_id: &str) -> StoreResult<bool> {
    let store = store.clone();
    let (tenant, job_id) = (tenant.to_string(), job_id.to_string());
    detached(async move {
        let (mut transaction, _turn) = store.begin().await?;
        // The job row first (see `append_chunks`), then its output.
        let deleted = sqlx::query("DELETE FROM export_jobs WHERE tenant = $1 AND job_id = $2")
            .bind(&tenant)
            .bind(&job_id)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        sqlx::query("DELETE FROM export_chunks WHERE tenant = $1 AND job_id = $2")
            .bind(&tenant)
            .bind(&job_id)
            .execute(&mut *transaction)
            .await
            .map_err(classify)?;
        transaction.commit().await.map_err(classify)?;
        Ok(deleted.rows_affected() == 1)
    })
    .await
}

pub(super) async fn sweep(store: &SqlStore, now_us: i64) -> StoreResult<u64> {
    let expired = sqlx::query("SELECT tenant, job_id FROM export_jobs WHERE expires_us < $1")
        .bind(now_us)
        .fetch_all(&store.pool)
        .await
        .map_err(classify)?;
    let mut swept = 0;
    for row in &expired {
        let tenant: String = row.try_get("tenant").map_err(internal)?;
        let job_id: String = row.try_get("job_id").map_err(internal)?;
        if delete_job(store, &tenant, &job_id).await? {
            swept += 1;
        }
    }
    Ok(swept)
}
