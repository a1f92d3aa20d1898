//! History Bundles (http://hl7.org/fhir/R4/http.html#history): one entry per version, newest
//! first, with `request` and `response` as the specification requires, and paging links.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::store::{VersionRecord, WriteMethod};

/// A FHIR `instant` for a stored time (microsecond precision, UTC).
pub fn instant(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The weak ETag of a version, `W/"3"`.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// One `Bundle.entry` of a history Bundle.
///
/// # Errors
/// 500 when a stored body is not JSON (a broken invariant).
pub fn history_entry(base_url: &str, record: &VersionRecord) -> ApiResult<Value> {
    let full_url = format!("{base_url}/{}/{}", record.resource_type, record.id);
    let (url, status) = match record.method {
        WriteMethod::Post => (record.resource_type.clone(), "201 Created"),
        WriteMethod::Put if record.version == 1 => (
            format!("{}/{}", record.resource_type, record.id),
            "201 Created",
        ),
        WriteMethod::Put => (format!("{}/{}", record.resource_type, record.id), "200 OK"),
        WriteMethod::Delete => (
            format!("{}/{}", record.resource_type, record.id),
            "204 No Content",
        ),
    };
    let mut entry = json!({
        "fullUrl": full_url,
        "request": { "method": record.method.as_str(), "url": url },
        "response": {
            "status": status,
            "etag": etag(record.version),
            "lastModified": instant(record.last_updated)
        }
    });
    if let Some(body) = &record.body {
        let resource: Value = serde_json::from_slice(body).map_err(|_| {
            ApiError::Internal(format!(
                "stored body of {}/{} version {} is not JSON",
                record.resource_type, record.id, record.version
            ))
        })?;
        entry["resource"] = resource;
    }
    Ok(entry)
}

/// A `history` Bundle from its entries and links (`self`, `next`).
pub fn history_bundle(entries: Vec<Value>, links: Vec<(&str, String)>) -> Value {
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": instant(Utc::now()) },
        "type": "history",
        "link": links
            .into_iter()
            .map(|(relation, url)| json!({ "relation": relation, "url": url }))
            .collect::<Vec<_>>(),
        "entry": entries,
    })
}
