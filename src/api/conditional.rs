//! Matching for conditional create, update and delete: any search the search API accepts
//! (http://hl7.org/fhir/R4/http.html#cond-update), evaluated by the search engine on the
//! caller's permit, so a conditional interaction can only find what the caller may see.
//!
//! Unlike a search, a parameter that would be ignored is refused with 400: ignoring a criterion
//! widens the match, and a conditional delete could then remove the wrong resource. A query with
//! no criterion at all is refused too.

use super::{App, QueryParams};
use crate::authz::decision::Permit;
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::search::engine::Search;
use crate::search::query;
use crate::store::VersionRecord;

/// More matches than any conditional interaction acts on: two already mean 412.
const MATCH_LIMIT: usize = 2;

/// The current, not deleted resources of `resource_type` that match every criterion (at most
/// two: the caller only needs to know whether there are none, one, or several).
///
/// # Errors
/// 400 for missing, malformed or unsupported criteria; 503 when the database is down.
pub async fn find(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    query: &QueryParams,
) -> ApiResult<Vec<VersionRecord>> {
    let parsed = query::parse(Some(resource_type), &query.0, &app.search.registry)
        .map_err(|error| ApiError::invalid(IssueCode::Invalid, error.to_string()))?;
    if !parsed.ignored.is_empty() {
        let issues = parsed
            .ignored
            .iter()
            .map(|ignored| {
                Issue::new(
                    IssueCode::NotSupported,
                    format!(
                        "parameter {} cannot be used in a conditional interaction: {}",
                        ignored.name, ignored.reason
                    ),
                )
            })
            .collect();
        return Err(ApiError::Invalid(issues));
    }
    if parsed.criteria.is_empty() {
        return Err(ApiError::invalid(
            IssueCode::NotSupported,
            "a conditional interaction needs search criteria",
        ));
    }
    let search = Search::with_permit(app, permit).await?;
    let found = search.all(&parsed.criteria, MATCH_LIMIT).await?;
    Ok(found.into_iter().map(|found| found.record).collect())
}
