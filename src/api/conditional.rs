//! Matching for conditional create, update and delete on `_id` and `identifier` (token
//! semantics: `system|value`, `|value`, `value`, `system|`; commas are alternatives, repeated
//! parameters must all match).
//!
//! Until the search index exists (a later issue, with keyed blind indexes so that identifiers are
//! never stored in clear), an `identifier` criterion reads the current versions of the type and
//! checks each in the application: exact, but linear in the number of resources of the type.
//! Criteria it does not understand are refused with 400 rather than ignored, because ignoring a
//! criterion would widen the match and a conditional delete could then remove the wrong resource.

use serde_json::Value;

use super::{App, QueryParams};
use crate::authz::decision::Permit;
use crate::error::{ApiError, ApiResult, Issue, IssueCode};
use crate::store::VersionRecord;

/// How many current versions one scan step reads.
const SCAN_PAGE: usize = 1000;

/// Parameters that shape the response, not the match.
const RESULT_PARAMETERS: &[&str] = &["_format", "_pretty"];

struct Criteria {
    ids: Option<Vec<String>>,
    identifiers: Vec<Vec<TokenCriterion>>,
}

struct TokenCriterion {
    system: Option<String>,
    value: Option<String>,
}

/// The current, not deleted resources of `resource_type` that match every criterion.
///
/// # Errors
/// 400 for missing or unsupported criteria; 503 when the database is down.
pub async fn find(
    app: &App,
    permit: &Permit,
    resource_type: &str,
    query: &QueryParams,
) -> ApiResult<Vec<VersionRecord>> {
    let criteria = parse(query)?;
    let scope = permit.scope();
    let mut matches = Vec::new();
    if let Some(ids) = &criteria.ids {
        for id in ids {
            if let Some(record) = app.store.read_current(scope, resource_type, id).await? {
                if record.deleted {
                    continue;
                }
                let Some(record) = app.open_visible(permit, record).await? else {
                    continue;
                };
                if matches_identifiers(&record, &criteria.identifiers)? {
                    matches.push(record);
                }
            }
        }
        return Ok(matches);
    }
    let mut after: Option<String> = None;
    loop {
        let page = app
            .store
            .current_of_type(scope, resource_type, after.as_deref(), SCAN_PAGE)
            .await?;
        let full = page.len() == SCAN_PAGE;
        after = page.last().map(|record| record.id.clone());
        for record in page {
            let Some(record) = app.open_visible(permit, record).await? else {
                continue;
            };
            if matches_identifiers(&record, &criteria.identifiers)? {
                matches.push(record);
            }
        }
        if !full {
            return Ok(matches);
        }
    }
}

fn parse(query: &QueryParams) -> ApiResult<Criteria> {
    let mut criteria = Criteria {
        ids: None,
        identifiers: Vec::new(),
    };
    for (name, value) in &query.0 {
        match name.as_str() {
            "_id" => {
                let ids: Vec<String> = value.split(',').map(str::to_string).collect();
                if ids.iter().any(|id| !crate::fhir::is_valid_id(id)) {
                    return Err(unsupported("_id must be a valid FHIR id"));
                }
                criteria.ids = Some(match criteria.ids.take() {
                    // `_id=a&_id=b` must match both: only an id in both lists can.
                    Some(previous) => previous.into_iter().filter(|id| ids.contains(id)).collect(),
                    None => ids,
                });
            }
            "identifier" => criteria
                .identifiers
                .push(value.split(',').map(parse_token).collect()),
            name if RESULT_PARAMETERS.contains(&name) => {}
            _ => {
                return Err(unsupported(
                    "conditional interactions support only the _id and identifier parameters",
                ))
            }
        }
    }
    if criteria.ids.is_none() && criteria.identifiers.is_empty() {
        return Err(unsupported(
            "a conditional interaction needs criteria (_id or identifier)",
        ));
    }
    Ok(criteria)
}

fn parse_token(text: &str) -> TokenCriterion {
    let non_empty = |part: &str| (!part.is_empty()).then(|| part.to_string());
    match text.split_once('|') {
        // `|value`: an identifier without a system.
        Some(("", value)) => TokenCriterion {
            system: Some(String::new()),
            value: non_empty(value),
        },
        Some((system, value)) => TokenCriterion {
            system: Some(system.to_string()),
            value: non_empty(value),
        },
        None => TokenCriterion {
            system: None,
            value: Some(text.to_string()),
        },
    }
}

fn unsupported(message: &str) -> ApiError {
    ApiError::Invalid(vec![Issue::new(IssueCode::NotSupported, message)])
}

fn matches_identifiers(record: &VersionRecord, all_of: &[Vec<TokenCriterion>]) -> ApiResult<bool> {
    if all_of.is_empty() {
        return Ok(true);
    }
    let Some(body) = &record.body else {
        return Ok(false);
    };
    let resource: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::Internal("a stored body is not JSON".into()))?;
    let identifiers: Vec<&Value> = match resource.get("identifier") {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(single @ Value::Object(_)) => vec![single],
        _ => Vec::new(),
    };
    Ok(all_of.iter().all(|any_of| {
        any_of.iter().any(|criterion| {
            identifiers
                .iter()
                .any(|identifier| token_matches(identifier, criterion))
        })
    }))
}

fn token_matches(identifier: &Value, criterion: &TokenCriterion) -> bool {
    let system = identifier.get("system").and_then(Value::as_str);
    let value = identifier.get("value").and_then(Value::as_str);
    let system_ok = match criterion.system.as_deref() {
        None => true,
        Some("") => system.is_none(),
        Some(expected) => system == Some(expected),
    };
    let value_ok = match criterion.value.as_deref() {
        None => true,
        Some(expected) => value == Some(expected),
    };
    system_ok && value_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn criterion(text: &str) -> TokenCriterion {
        parse_token(text)
    }

    #[test]
    fn token_forms_match_per_the_search_rules() {
        let mrn = json!({"system": "urn:mrn", "value": "123"});
        let bare = json!({"value": "123"});
        assert!(token_matches(&mrn, &criterion("urn:mrn|123")));
        assert!(!token_matches(&mrn, &criterion("urn:other|123")));
        assert!(token_matches(&mrn, &criterion("123")));
        assert!(token_matches(&bare, &criterion("123")));
        assert!(token_matches(&bare, &criterion("|123")));
        assert!(!token_matches(&mrn, &criterion("|123")));
        assert!(token_matches(&mrn, &criterion("urn:mrn|")));
        assert!(!token_matches(&mrn, &criterion("12")));
    }

    #[test]
    fn unknown_or_missing_criteria_are_refused_not_ignored() {
        assert!(parse(&QueryParams::parse("name=Doe")).is_err());
        assert!(parse(&QueryParams::parse("_format=json")).is_err());
        assert!(parse(&QueryParams::parse("")).is_err());
        assert!(parse(&QueryParams::parse("_id=a'%20OR%201=1")).is_err());
        let both = parse(&QueryParams::parse("_id=a,b&_id=b,c")).unwrap();
        assert_eq!(both.ids.unwrap(), ["b"]);
    }
}
