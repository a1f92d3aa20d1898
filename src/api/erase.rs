//! `POST /Patient/{id}/$erase`: erasure of a patient's whole record (GDPR Art. 17) by
//! crypto-shredding. Defined by this server: `GET /OperationDefinition/erase`.
//!
//! Statuses: 200 with a `Parameters` receipt (the tombstone: pseudonym, resources erased,
//! time) · 403 when the caller's scopes (`Patient.d`) or roles (a policy line naming `erase`:
//! compliance-officer only) never allow it · 404 unknown, already erased, or outside the
//! caller's reach · 409 while a legal hold stands (`custodian erasure hold`), with the case
//! reference in the OperationOutcome and nothing changed · 503 when the database is down.
//!
//! What happens, in one database transaction ([`crate::store::Store::erase_compartment`]): the
//! compartment's data key rows are deleted (every version sealed under them becomes unreadable
//! anywhere the wrapped key is not kept), then every version, head and index row of the
//! compartment's resources, the patient id → pseudonym mapping, and a tombstone plus the
//! audit record are written. The audit record names the patient only by the pseudonym. After
//! the commit: this node's cache drops the keys, and the erasure ledger outside the database
//! gets its line ([`crate::erasure`]); other nodes follow within `erasure.poll_ms`.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::{audit, negotiate, value_response, AppState, QueryParams};
use crate::authz::decision::Interaction;
use crate::authz::principal::Principal;
use crate::error::{ApiError, ApiResult};
use crate::fhir::bundle::instant;
use crate::store::{ErasureOutcome, ErasureRequest};

/// `POST /Patient/{id}/$erase`.
#[tracing::instrument(skip_all)]
pub async fn erase(
    app: AppState,
    principal: std::sync::Arc<Principal>,
    id: String,
    query: QueryParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // The record names the compartment, never the patient's id (which the route put there).
    audit::note(|context| {
        context.interaction = "erase";
        context.resource_id = None;
    });
    let format = negotiate(&query, &headers)?;
    let permit = app
        .decide(&principal, Interaction::Erase, Some("Patient"))
        .await?;
    let not_found = || ApiError::NotFound("no such patient".into());
    if !crate::fhir::is_valid_id(&id) {
        return Err(not_found());
    }
    let scope = permit.scope();
    let record = app
        .store
        .read_current(scope, "Patient", &id)
        .await?
        .ok_or_else(not_found)?;
    // The per-resource decision (tenant, security labels…) as for any other interaction.
    let visible = app.open_visible(&permit, record).await?;
    audit::note(|context| {
        context.resource_id = None;
        context.version = None;
    });
    if visible.is_none() {
        return Err(not_found());
    }
    let pseudonym = app
        .store
        .find_pseudonym(scope, &id)
        .await?
        .ok_or_else(not_found)?;
    audit::note(|context| context.patient = Some(pseudonym.clone()));
    let context = audit::current().unwrap_or_default();
    let outcome = app
        .store
        .erase_compartment(
            scope,
            &ErasureRequest {
                pseudonym: pseudonym.clone(),
                erased_at: chrono::Utc::now(),
                respect_holds: true,
                audit: Some(app.audit_entry(&context, "erase", StatusCode::OK.as_u16())),
            },
        )
        .await?;
    let (tombstone, changed) = match outcome {
        ErasureOutcome::Held(hold) => {
            return Err(ApiError::Conflict(format!(
                "the patient is under legal hold (case {}); nothing was erased",
                hold.case_reference
            )))
        }
        ErasureOutcome::Erased { tombstone, changed } => (tombstone, changed),
    };
    audit::note(|context| context.appended = changed);
    app.vault.forget(&tombstone.key_ids);
    tracing::info!(
        pseudonym = %tombstone.pseudonym,
        resources = tombstone.resources_erased,
        "patient compartment erased"
    );
    // The erasure is committed; without its ledger line a restored older backup could bring the
    // patient back, so the caller must hear of it (the line is retried by the watcher and at start).
    app.erasure_ledger
        .record(&tombstone)
        .await
        .map_err(|error| {
            tracing::error!(%error, "erasure committed but not written to the erasure ledger");
            ApiError::Internal(
                "the erasure was committed but the erasure ledger could not be written".into(),
            )
        })?;
    let erased = chrono::DateTime::from_timestamp_micros(tombstone.erased_us).unwrap_or_default();
    let receipt: Value = json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "tombstone", "valueString": tombstone.pseudonym },
            { "name": "resourcesErased", "valueInteger": tombstone.resources_erased },
            { "name": "erased", "valueInstant": instant(erased) }
        ]
    });
    value_response(StatusCode::OK, &receipt, format)
}

/// The OperationDefinition of `$erase`, served at `GET /OperationDefinition/erase`.
pub fn operation_definition(base_url: &str) -> Value {
    json!({
        "resourceType": "OperationDefinition",
        "id": "erase",
        "url": format!("{base_url}/OperationDefinition/erase"),
        "version": env!("CARGO_PKG_VERSION"),
        "name": "Erase",
        "title": "Erase a patient's record (crypto-shredding)",
        "status": "active",
        "kind": "operation",
        "publisher": "Custodian",
        "description": "Destroys the patient compartment's data key and deletes every version, \
            history and search index row of the compartment; keeps a tombstone (pseudonym and time) \
            and the pseudonymous audit trail. Refused with 409 while a legal hold stands. Only roles \
            whose policy names the erase interaction (compliance-officer) may invoke it.",
        "affectsState": true,
        "code": "erase",
        "resource": ["Patient"],
        "system": false,
        "type": false,
        "instance": true,
        "parameter": [
            {
                "name": "tombstone", "use": "out", "min": 1, "max": "1", "type": "string",
                "documentation": "The compartment pseudonym that the tombstone and the audit trail keep"
            },
            {
                "name": "resourcesErased", "use": "out", "min": 1, "max": "1", "type": "integer",
                "documentation": "How many resources (with all their versions) were erased"
            },
            {
                "name": "erased", "use": "out", "min": 1, "max": "1", "type": "instant",
                "documentation": "When the erasure committed"
            }
        ]
    })
}
