//! Break-the-glass: an emergency override of a consent deny, always accountable.
//!
//! A request declares an emergency with the header `X-Break-Glass: <reason>`. It is honoured
//! only when all of these hold, else the request is refused with 403 and nothing is read:
//! - the reason is not blank (it is what the compliance review judges);
//! - one of the caller's roles may `break-glass` under the policy (`policies/policy.csv`);
//! - the access token's break-the-glass session is still open: the token's first override
//!   opens a session of `consent.break_glass_secs`; after it closes, that token cannot break
//!   the glass again (a new sign-in is a new, separately reviewed declaration).
//!
//! While honoured, the request's purpose of use is emergency treatment (`ETREAT`), each consent
//! deny it overrides is counted in its AuditEvent, and every such AuditEvent carries the DICOM
//! "Emergency Override Started" code (DCM 110127). Sessions and their reviews are append-only
//! tables; the reason and review notes are sealed (they may name a patient).

use sha2::{Digest, Sha256};

use crate::api::App;
use crate::authz::policy::PolicyAttributes;
use crate::authz::principal::{Emergency, Principal};
use crate::crypto::envelope::{self, RecordBinding};
use crate::error::{ApiError, ApiResult};
use crate::store::{BreakGlassReview, BreakGlassSession, Scope};

/// The request header that declares an emergency.
pub const HEADER: &str = "x-break-glass";

/// The policy action a role needs to break the glass.
pub const POLICY_ACTION: &str = "break-glass";

/// The purpose of use of an honoured emergency (v3-ActReason).
pub const EMERGENCY_PURPOSE: &str = "ETREAT";

/// Longest reason accepted, in characters.
const MAX_REASON_CHARS: usize = 1000;

/// The HKDF purpose of the key that seals reasons and review notes.
const SEAL_KEY_PURPOSE: &str = "custodian/break-glass/v1";

/// Review outcomes a compliance officer may record.
pub const REVIEW_STATUSES: &[&str] = &["justified", "unjustified", "needs-follow-up"];

/// Honours or refuses an emergency declaration; on success returns the principal as it acts
/// for this request (purpose `ETREAT`, the session attached).
///
/// # Errors
/// 403 with the reason when the declaration cannot be honoured; 503 when the database or the
/// key provider is down.
pub async fn declare(
    app: &App,
    principal: &Principal,
    token: &str,
    reason: &str,
) -> ApiResult<Principal> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(ApiError::Forbidden(
            "break-the-glass needs a reason: X-Break-Glass must state why".into(),
        ));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::Forbidden(format!(
            "the break-the-glass reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    let attributes = PolicyAttributes {
        purpose: EMERGENCY_PURPOSE.into(),
        same_tenant: true,
        ..PolicyAttributes::default()
    };
    if !app
        .decider
        .policy()
        .enforce(&principal.roles, "*", POLICY_ACTION, &attributes)
    {
        return Err(ApiError::Forbidden(
            "the caller's roles may not break the glass".into(),
        ));
    }
    let scope = app.decider.system_scope();
    let now = chrono::Utc::now().timestamp_micros();
    let session_id = uuid::Uuid::new_v4().to_string();
    let window = i64::try_from(app.settings.consent.break_glass_secs)
        .unwrap_or(i64::MAX / 1_000_000)
        .saturating_mul(1_000_000);
    let proposed = BreakGlassSession {
        tenant: scope.tenant().to_string(),
        session_id: session_id.clone(),
        token_hash: token_hash(token),
        subject: principal.subject.clone(),
        fhir_user: principal
            .fhir_user
            .as_ref()
            .map(|user| format!("{}/{}", user.resource_type, user.id)),
        roles: principal.roles.join(","),
        opened_us: now,
        expires_us: now.saturating_add(window),
        reason: seal(app, &scope, &session_id, "reason", reason.as_bytes()).await?,
    };
    let session = app.store.open_break_glass(&proposed).await?;
    if now > session.expires_us {
        return Err(ApiError::Forbidden(
            "this access token's break-the-glass session has closed; sign in again to declare a new emergency"
                .into(),
        ));
    }
    Ok(Principal {
        purpose_of_use: Some(EMERGENCY_PURPOSE.into()),
        emergency: Some(Emergency {
            session_id: session.session_id,
            expires_us: session.expires_us,
        }),
        ..principal.clone()
    })
}

/// SHA-256 of the access token, hex: what ties a session to a token without storing it.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Records a compliance review of a session.
///
/// # Errors
/// 422 for an unknown status, 404 for an unknown session, 503 when the database is down.
pub async fn review(
    app: &App,
    scope: &Scope,
    session_id: &str,
    reviewer: &str,
    status: &str,
    note: Option<&str>,
) -> ApiResult<()> {
    if !REVIEW_STATUSES.contains(&status) {
        return Err(ApiError::Unprocessable(format!(
            "status must be one of {}",
            REVIEW_STATUSES.join(", ")
        )));
    }
    let reviewed_us = chrono::Utc::now().timestamp_micros();
    let note = match note.map(str::trim).filter(|note| !note.is_empty()) {
        Some(note) => Some(
            seal(
                app,
                scope,
                session_id,
                &format!("note-{reviewed_us}"),
                note.as_bytes(),
            )
            .await?,
        ),
        None => None,
    };
    let added = app
        .store
        .add_break_glass_review(&BreakGlassReview {
            tenant: scope.tenant().to_string(),
            session_id: session_id.to_string(),
            reviewed_us,
            reviewer: reviewer.to_string(),
            status: status.to_string(),
            note,
        })
        .await?;
    if added {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no break-the-glass session {session_id}"
        )))
    }
}

/// The text of a sealed reason or note; `None` when it does not open (altered or re-keyed).
///
/// # Errors
/// 503 when the tenant's key cannot be fetched.
pub async fn open_sealed(
    app: &App,
    scope: &Scope,
    session_id: &str,
    part: &str,
    sealed: &[u8],
) -> ApiResult<Option<String>> {
    let key = app.vault.derived_key(scope, SEAL_KEY_PURPOSE).await?;
    Ok(
        envelope::open(&key, &binding(scope, session_id, part), sealed)
            .ok()
            .and_then(|plain| String::from_utf8(plain).ok()),
    )
}

async fn seal(
    app: &App,
    scope: &Scope,
    session_id: &str,
    part: &str,
    plaintext: &[u8],
) -> ApiResult<Vec<u8>> {
    let key = app.vault.derived_key(scope, SEAL_KEY_PURPOSE).await?;
    envelope::seal(&key, &binding(scope, session_id, part), plaintext)
        .map_err(|error| ApiError::Internal(format!("cannot seal: {error}")))
}

/// Binds a sealed text to its session and part, so that it cannot be moved to another row.
fn binding<'a>(scope: &'a Scope, session_id: &'a str, part: &'a str) -> RecordBinding<'a> {
    RecordBinding {
        tenant: scope.tenant(),
        resource_type: "break-glass",
        id: session_id,
        version: 0,
        compartment: Some(part),
    }
}
