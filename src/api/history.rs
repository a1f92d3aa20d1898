//! `history` (http://hl7.org/fhir/R4/http.html#history) at instance (`/{type}/{id}/_history`),
//! type (`/{type}/_history`) and system (`/_history`) level: a Bundle of type `history`, newest
//! version first, with `_count`, `_since` and paging.
//!
//! Paging keys on the global write sequence: the `next` link carries the sequence number of the
//! last entry shown (`_cursor`), so versions written while a client pages do not shift the
//! pages it has yet to read.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, NaiveDate, Utc};

use super::{check_resource_type, negotiate, value_response, App, AppState, Caller, QueryParams};
use crate::authz::decision::{Interaction, Permit};
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::fhir::bundle::{history_bundle, history_entry};
use crate::store::HistoryQuery;

/// `GET /{type}/{id}/_history`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn history_instance(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path((resource_type, id)): Path<(String, String)>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let permit = app
        .decide(
            &principal,
            Interaction::HistoryInstance,
            Some(&resource_type),
        )
        .await?;
    let not_found = || ApiError::resource_not_found(&resource_type, &id);
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let current = app
        .store
        .read_current(permit.scope(), &resource_type, &id)
        .await?
        .ok_or_else(not_found)?;
    // A resource the caller may not see now has no history for them either.
    app.open_visible(&permit, current)
        .await?
        .ok_or_else(not_found)?;
    let path = format!("{resource_type}/{id}/_history");
    respond(
        &app,
        &permit,
        &query,
        &headers,
        Some(resource_type),
        Some(id),
        &path,
    )
    .await
}

/// `GET /{type}/_history`.
#[tracing::instrument(skip_all, fields(resource_type = %resource_type))]
pub async fn history_type(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(resource_type): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_resource_type(&resource_type)?;
    let permit = app
        .decide(&principal, Interaction::HistoryType, Some(&resource_type))
        .await?;
    let path = format!("{resource_type}/_history");
    respond(
        &app,
        &permit,
        &query,
        &headers,
        Some(resource_type),
        None,
        &path,
    )
    .await
}

/// `GET /_history`.
#[tracing::instrument(skip_all)]
pub async fn history_system(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let permit = app
        .decide(&principal, Interaction::HistorySystem, None)
        .await?;
    respond(&app, &permit, &query, &headers, None, None, "_history").await
}

/// Reads pages of versions until `count` visible ones (plus one, to know a next page exists)
/// are found: what the caller may not see is left out, and paging counts only what remains.
async fn respond(
    app: &App,
    permit: &Permit,
    query: &QueryParams,
    headers: &HeaderMap,
    resource_type: Option<String>,
    id: Option<String>,
    path: &str,
) -> ApiResult<Response> {
    let format = negotiate(query, headers)?;
    let paging = Paging::parse(query, app.settings.page_size, app.settings.max_page_size)?;
    let mut history_query = HistoryQuery {
        resource_type,
        id,
        since: paging.since,
        until: None,
        compartment: permit.compartment_filter().map(str::to_string),
        before_sequence: paging.cursor,
        // One more than a page tells whether a next page exists.
        limit: paging.count + 1,
    };
    let mut records = Vec::with_capacity(paging.count + 1);
    loop {
        let batch = app.store.history(permit.scope(), &history_query).await?;
        let exhausted = batch.len() < history_query.limit;
        history_query.before_sequence = batch.last().map(|record| record.sequence);
        for record in batch {
            if let Some(visible) = app.open_visible(permit, record).await? {
                records.push(visible);
                if records.len() > paging.count {
                    break;
                }
            }
        }
        if exhausted || records.len() > paging.count {
            break;
        }
    }
    let has_next = records.len() > paging.count;
    records.truncate(paging.count);
    let mut entries = Vec::with_capacity(records.len());
    for record in &records {
        entries.push(history_entry(&app.base_url, record)?);
    }
    let base = format!("{}/{path}", app.base_url);
    let mut links = vec![(
        "self",
        format!("{base}?{}", paging.query_string(paging.cursor)),
    )];
    if has_next {
        let last = records.last().map(|record| record.sequence);
        links.push(("next", format!("{base}?{}", paging.query_string(last))));
    }
    value_response(StatusCode::OK, &history_bundle(entries, links), format)
}

struct Paging {
    count: usize,
    since: Option<DateTime<Utc>>,
    since_text: Option<String>,
    cursor: Option<i64>,
    format: Option<String>,
}

impl Paging {
    fn parse(query: &QueryParams, default_count: usize, max_count: usize) -> ApiResult<Self> {
        let mut paging = Paging {
            count: default_count.clamp(1, max_count.max(1)),
            since: None,
            since_text: None,
            cursor: None,
            format: None,
        };
        for (name, value) in &query.0 {
            match name.as_str() {
                "_count" => {
                    let count: usize = value
                        .parse()
                        .map_err(|_| invalid("_count must be a positive integer", "_count"))?;
                    // A count of 0 would page forever; larger than the maximum is capped.
                    paging.count = count.clamp(1, max_count.max(1));
                }
                "_since" => {
                    paging.since = Some(parse_instant(value).ok_or_else(|| {
                        invalid("_since must be a FHIR instant or date", "_since")
                    })?);
                    paging.since_text = Some(value.clone());
                }
                "_cursor" => {
                    paging.cursor = Some(value.parse().map_err(|_| {
                        invalid("_cursor is not a paging cursor of this server", "_cursor")
                    })?);
                }
                "_format" => paging.format = Some(value.clone()),
                "_pretty" => {}
                _ => {
                    return Err(ApiError::Invalid(vec![Issue::new(
                        IssueCode::NotSupported,
                        "history supports _count, _since and _format",
                    )]))
                }
            }
        }
        Ok(paging)
    }

    fn query_string(&self, cursor: Option<i64>) -> String {
        let mut serializer = form_urlencoded::Serializer::new(String::new());
        serializer.append_pair("_count", &self.count.to_string());
        if let Some(since) = &self.since_text {
            serializer.append_pair("_since", since);
        }
        if let Some(format) = &self.format {
            serializer.append_pair("_format", format);
        }
        if let Some(cursor) = cursor {
            serializer.append_pair("_cursor", &cursor.to_string());
        }
        serializer.finish()
    }
}

fn invalid(message: &str, location: &str) -> ApiError {
    ApiError::Invalid(vec![Issue::new(IssueCode::Value, message).at(location)])
}

/// A FHIR instant (`2024-01-02T03:04:05Z`) or a date (`2024-01-02`, taken as its start in UTC).
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc())
}

#[cfg(test)]
mod tests {
    use super::parse_instant;

    #[test]
    fn since_accepts_instants_and_dates() {
        assert!(parse_instant("2024-01-02T03:04:05Z").is_some());
        assert!(parse_instant("2024-01-02T03:04:05.123+02:00").is_some());
        assert!(parse_instant("2024-01-02").is_some());
        assert!(parse_instant("2024-13-02").is_none());
        assert!(parse_instant("yesterday").is_none());
    }
}
