//! Authentication at the edge, and the SMART configuration document.
//!
//! Every endpoint needs a valid bearer token except `/metadata`,
//! `/.well-known/smart-configuration`, `/health`, `/ready` and the server's own
//! `/OperationDefinition/{id}`, which hold no PHI. A missing or
//! invalid token is a 401 with `WWW-Authenticate: Bearer`; why it failed goes to the log only.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::authz::principal::Principal;
use crate::error::ApiError;

/// Paths that answer without a token.
const OPEN_PATHS: &[&str] = &[
    "/metadata",
    "/.well-known/smart-configuration",
    "/health",
    "/ready",
];

/// The server's own OperationDefinitions (`/OperationDefinition/erase`): public definitions,
/// referenced from the open CapabilityStatement.
const OPERATION_DEFINITIONS: &str = "/OperationDefinition/";

/// Middleware: validates the bearer token and puts the [`Principal`] in the request.
pub async fn authenticate(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    // Only `/OperationDefinition/{id}` itself: deeper paths (`…/{id}/_history`) are other routes.
    let operation_definition = path
        .strip_prefix(OPERATION_DEFINITIONS)
        .is_some_and(|id| !id.contains('/'));
    if OPEN_PATHS.contains(&path) || operation_definition {
        return next.run(request).await;
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        tracing::info!(reason = "no bearer token", "authentication failed");
        return unauthenticated(&app, &request);
    };
    match app.tokens.authenticate(token).await {
        Ok(principal) => {
            // The budget is charged before any other work (break-the-glass included).
            let budget = app.rate_limits.check_client(&principal);
            if let Some(refusal) = budget.refusal() {
                let noted = principal.clone();
                super::audit::note(|context| context.principal = Some(noted));
                return refusal;
            }
            // An emergency declaration is judged once per request, before any data is read;
            // one that cannot be honoured refuses the request (the refusal is audited).
            let principal = match request.headers().get(crate::consent::break_glass::HEADER) {
                None => principal,
                Some(value) => {
                    super::audit::note(|context| context.principal = Some(principal.clone()));
                    let reason = value.to_str().unwrap_or_default();
                    match crate::consent::break_glass::declare(&app, &principal, token, reason)
                        .await
                    {
                        Ok(emergency) => Arc::new(emergency),
                        Err(error) => return error.into_response(),
                    }
                }
            };
            let noted = principal.clone();
            super::audit::note(|context| context.principal = Some(noted));
            request.extensions_mut().insert::<Arc<Principal>>(principal);
            let mut response = next.run(request).await;
            budget.annotate(response.headers_mut());
            response
        }
        Err(error) => {
            tracing::info!(reason = %error, "authentication failed");
            unauthenticated(&app, &request)
        }
    }
}

/// The answer to a request without a valid token: 401, or 429 once its address has sent too
/// many of them.
fn unauthenticated(app: &AppState, request: &Request) -> Response {
    let address = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|connected| connected.0.ip());
    app.rate_limits
        .check_address(address)
        .refusal()
        .unwrap_or_else(|| ApiError::Unauthorized.into_response())
}

/// `GET /.well-known/smart-configuration`
/// (https://hl7.org/fhir/smart-app-launch/conformance.html).
pub async fn smart_configuration(State(app): State<AppState>) -> Json<Value> {
    // The identity provider's own endpoints, as its discovery document states them.
    let endpoints = app.tokens.first_issuer_endpoints().await;
    Json(json!({
        "issuer": endpoints.as_ref().map(|found| found.issuer.clone()),
        "jwks_uri": endpoints.as_ref().map(|found| found.jwks_uri.clone()),
        "authorization_endpoint": endpoints.as_ref().map(|found| found.authorization_endpoint.clone()),
        "token_endpoint": endpoints.as_ref().and_then(|found| found.token_endpoint.clone()),
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "RS256", "ES256"],
        "scopes_supported": [
            "openid", "fhirUser", "launch", "launch/patient", "offline_access",
            "patient/*.rs", "user/*.cruds", "system/*.cruds", "patient/*.read", "user/*.*", "system/*.*"
        ],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-symmetric",
            "client-confidential-asymmetric", "context-standalone-patient", "permission-patient",
            "permission-user", "permission-v1", "permission-v2", "sso-openid-connect"
        ]
    }))
}
