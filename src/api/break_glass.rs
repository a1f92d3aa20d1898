//! Compliance review of break-the-glass (see `crate::consent::break_glass`).
//!
//! - `GET /_audit/break-glass[?since=DATE][&status=unreviewed|justified|unjustified|needs-follow-up]`:
//!   every emergency session, newest first, with who opened it, when, for how long, the stated
//!   reason, the requests made under it (AuditEvent ids, consent denies overridden) and its
//!   reviews.
//! - `POST /_audit/break-glass/{session}/review` with `{"status": …, "note": …}`: records a
//!   review (append-only; the latest review is the session's status). Nobody reviews their own
//!   emergency.
//!
//! Both need the caller to search the audit trail, which is what is reviewed (compliance-officer and admin in the shipped
//! policy). The reason and notes are sealed at rest and shown only here.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{AppState, Caller, QueryParams};
use crate::authz::decision::{Interaction, Permit};
use crate::consent::break_glass;
use crate::error::{ApiError, ApiResult, IssueCode};
use crate::store::{AuditQuery, BreakGlassSession};

/// Most sessions one listing returns.
const MAX_SESSIONS: usize = 200;

/// Most audit records read per session to list its requests.
const MAX_EVENTS_PER_SESSION: usize = 1000;

/// `GET /_audit/break-glass`.
pub async fn list(
    State(app): State<AppState>,
    Extension(principal): Caller,
    query: QueryParams,
) -> ApiResult<Response> {
    let permit = super::audit::compliance_permit(&app, &principal, Interaction::Search).await?;
    let since_us = match query.first("since") {
        None => 0,
        Some(text) => crate::search::values::parse_date_range(text)
            .map(|(low, _)| low)
            .ok_or_else(|| ApiError::invalid(IssueCode::Value, "since must be a FHIR date"))?,
    };
    let wanted_status = query.first("status");
    if let Some(status) = wanted_status {
        if status != "unreviewed" && !break_glass::REVIEW_STATUSES.contains(&status) {
            return Err(ApiError::invalid(
                IssueCode::Value,
                "status must be unreviewed, justified, unjustified or needs-follow-up",
            ));
        }
    }
    let scope = permit.scope();
    let sessions = app
        .store
        .break_glass_sessions(scope.tenant(), since_us, MAX_SESSIONS)
        .await?;
    let ids: Vec<String> = sessions.iter().map(|s| s.session_id.clone()).collect();
    let reviews = app.store.break_glass_reviews(scope.tenant(), &ids).await?;
    let mut listed = Vec::new();
    for session in &sessions {
        let mut session_reviews = Vec::new();
        for review in reviews
            .iter()
            .filter(|r| r.session_id == session.session_id)
        {
            let note = match &review.note {
                Some(sealed) => {
                    break_glass::open_sealed(
                        &app,
                        scope,
                        &session.session_id,
                        &format!("note-{}", review.reviewed_us),
                        sealed,
                    )
                    .await?
                }
                None => None,
            };
            session_reviews.push(json!({
                "status": review.status,
                "reviewer": review.reviewer,
                "reviewed": instant(review.reviewed_us),
                "note": note,
            }));
        }
        let status = session_reviews
            .last()
            .and_then(|review| review["status"].as_str())
            .unwrap_or("unreviewed")
            .to_string();
        if wanted_status.is_some_and(|wanted| wanted != status) {
            continue;
        }
        let reason =
            break_glass::open_sealed(&app, scope, &session.session_id, "reason", &session.reason)
                .await?;
        let (events, overrides) = session_events(&app, &permit, session).await?;
        listed.push(json!({
            "session": session.session_id,
            "subject": session.subject,
            "fhirUser": session.fhir_user,
            "roles": session.roles.split(',').filter(|role| !role.is_empty()).collect::<Vec<_>>(),
            "opened": instant(session.opened_us),
            "expires": instant(session.expires_us),
            "reason": reason,
            "status": status,
            "requests": events.len(),
            "consentDeniesOverridden": overrides,
            "auditEvents": events,
            "reviews": session_reviews,
        }));
    }
    Ok(Json(json!({ "sessions": listed })).into_response())
}

/// `POST /_audit/break-glass/{session}/review`.
pub async fn review(
    State(app): State<AppState>,
    Extension(principal): Caller,
    Path(session_id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let permit = super::audit::compliance_permit(&app, &principal, Interaction::Search).await?;
    let request: Value = serde_json::from_slice(&body).map_err(|_| {
        ApiError::invalid(
            IssueCode::Structure,
            "the body must be a JSON object with status and note",
        )
    })?;
    let status = request["status"]
        .as_str()
        .ok_or_else(|| ApiError::invalid(IssueCode::Required, "status is required"))?;
    let scope = permit.scope();
    let opened_by = app
        .store
        .break_glass_session(scope.tenant(), &session_id)
        .await?
        .map(|session| session.subject)
        .ok_or_else(|| ApiError::NotFound(format!("no break-the-glass session {session_id}")))?;
    if opened_by == principal.subject {
        return Err(ApiError::Forbidden(
            "nobody reviews their own emergency access".into(),
        ));
    }
    break_glass::review(
        &app,
        scope,
        &session_id,
        &principal.subject,
        status,
        request["note"].as_str(),
    )
    .await?;
    let mut response = Json(json!({
        "session": session_id,
        "status": status,
        "reviewer": principal.subject,
    }))
    .into_response();
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// The audit records of the requests made under a session (their AuditEvent ids) and how many
/// consent denies they overrode.
async fn session_events(
    app: &super::App,
    permit: &Permit,
    session: &BreakGlassSession,
) -> ApiResult<(Vec<String>, u64)> {
    let query = AuditQuery {
        agent: Some(session.subject.clone()),
        from_us: Some(session.opened_us),
        // Requests that started inside the window may be recorded just after it closes.
        to_us: Some(session.expires_us.saturating_add(60_000_000)),
        limit: MAX_EVENTS_PER_SESSION,
        ..AuditQuery::default()
    };
    let mut events = Vec::new();
    let mut overrides = 0u64;
    for stored in app.store.search_audit(permit.scope(), &query).await? {
        let Ok(record) = serde_json::from_slice::<Value>(&stored.record) else {
            continue;
        };
        if record["emergency_session"] == session.session_id.as_str() {
            events.push(stored.sequence.to_string());
            overrides += record["emergency_overrides"].as_u64().unwrap_or(0);
        }
    }
    Ok((events, overrides))
}

fn instant(micros: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|time| json!(crate::fhir::bundle::instant(time)))
        .unwrap_or(Value::Null)
}
