//! Authentication and authorization through the real server: every endpoint but the open ones
//! needs a valid token; scopes and roles decide interactions (403); compartments, care teams,
//! security labels and granular scopes decide resources (404, or left out of a Bundle).

use custodian::authz::dev::{DevIssuer, DevTokenRequest, DEV_ISSUER};
use serde_json::{json, Value};

use crate::both_backends;
use crate::helpers::{TestApp, FHIR_JSON};

/// A development token request for `role` with `scope` (ten minutes).
pub(crate) fn caller(role: &str, scope: &str) -> DevTokenRequest {
    DevTokenRequest {
        subject: format!("test-{role}"),
        roles: vec![role.to_string()],
        scope: scope.to_string(),
        lifetime_secs: 600,
        ..DevTokenRequest::default()
    }
}

pub(crate) fn patient_caller(patient: &str) -> DevTokenRequest {
    DevTokenRequest {
        patient: Some(patient.to_string()),
        fhir_user: Some(format!("Patient/{patient}")),
        ..caller("patient", "launch/patient patient/*.rs")
    }
}

pub(crate) fn practitioner_caller(practitioner: &str) -> DevTokenRequest {
    DevTokenRequest {
        fhir_user: Some(format!("Practitioner/{practitioner}")),
        ..caller("practitioner", "user/*.cruds")
    }
}

async fn status_with(
    app: &TestApp,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> u16 {
    let mut request = app
        .anonymous
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", FHIR_JSON)
            .body(body.to_string());
    }
    request.send().await.unwrap().status().as_u16()
}

async fn json_with(app: &TestApp, token: &str, path: &str) -> Value {
    let response = app
        .anonymous
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// Two patients with an Observation each; `p1` names Practitioner/doc as general practitioner.
async fn two_patients(app: &TestApp) -> (String, String, String, String) {
    let first = app
        .create_id(&json!({"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner/doc"}]}))
        .await;
    let second = app
        .create_id(&json!({"resourceType": "Patient", "active": true}))
        .await;
    let observation = |patient: &str, category: &str| {
        json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "subject": {"reference": format!("Patient/{patient}")}
        })
    };
    let first_obs = app.create_id(&observation(&first, "laboratory")).await;
    let second_obs = app.create_id(&observation(&second, "laboratory")).await;
    (first, second, first_obs, second_obs)
}

async fn tokens_are_required_and_checked(app: TestApp) {
    // Open endpoints.
    for path in [
        "metadata",
        "health",
        "ready",
        ".well-known/smart-configuration",
    ] {
        let response = app.anonymous.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} is open");
    }
    // Everything else: 401 with a Bearer challenge, and no hint of existence.
    let id = app.create_id(&json!({"resourceType": "Patient"})).await;
    for path in [
        format!("Patient/{id}"),
        "Patient/nobody".into(),
        "_history".into(),
    ] {
        let response = app.anonymous.get(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert!(response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
    }

    let issuer = DevIssuer::load_or_create(app.data_dir()).unwrap();
    let now = chrono::Utc::now().timestamp();
    let valid = json!({"iss": DEV_ISSUER, "sub": "x", "aud": app.base_url, "exp": now + 300, "nbf": now - 5,
                       "roles": ["ehr-system"], "scope": "system/*.cruds"});
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = valid.clone();
        change(&mut claims);
        issuer.sign_claims(&claims).unwrap()
    };
    let path = format!("Patient/{id}");
    assert_eq!(
        status_with(&app, &with(&|_| {}), "GET", &path, None).await,
        200,
        "the control token works"
    );
    let refused = [
        ("expired", with(&|claims| claims["exp"] = json!(now - 3600))),
        (
            "not yet valid",
            with(&|claims| claims["nbf"] = json!(now + 3600)),
        ),
        (
            "wrong issuer",
            with(&|claims| claims["iss"] = json!("https://evil.example")),
        ),
        (
            "wrong audience",
            with(&|claims| claims["aud"] = json!("https://other.example/fhir")),
        ),
        (
            "another tenant",
            with(&|claims| claims["tenant"] = json!("other-tenant")),
        ),
        (
            "no exp",
            with(&|claims| {
                claims.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "no subject and no client",
            with(&|claims| {
                claims.as_object_mut().unwrap().remove("sub");
            }),
        ),
        (
            "an empty subject",
            with(&|claims| claims["sub"] = json!("")),
        ),
    ];
    for (case, token) in &refused {
        assert_eq!(
            status_with(&app, token, "GET", &path, None).await,
            401,
            "{case}"
        );
    }
    // Forged tokens: alg none, a tampered payload, HS256 keyed with public material.
    let good = with(&|_| {});
    let parts: Vec<&str> = good.split('.').collect();
    let encode = |value: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let mut escalated = valid.clone();
    escalated["roles"] = json!(["admin", "ehr-system"]);
    let tampered = format!("{}.{}.{}", parts[0], encode(&escalated), parts[2]);
    let none = format!(
        "{}.{}.",
        encode(&json!({"alg": "none", "typ": "JWT"})),
        parts[1]
    );
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &valid,
        &jsonwebtoken::EncodingKey::from_secret(b"the issuer's public key bytes"),
    )
    .unwrap();
    for (case, token) in [
        ("tampered", &tampered),
        ("alg none", &none),
        ("HS256", &hs256),
        ("garbage", &"abc".to_string()),
    ] {
        assert_eq!(
            status_with(&app, token, "GET", &path, None).await,
            401,
            "{case}"
        );
    }
}
both_backends!(tokens, super::tokens_are_required_and_checked);

async fn scopes_bound_interactions(app: TestApp) {
    let (patient, ..) = two_patients(&app).await;
    let read_only = app.token(caller("ehr-system", "system/*.rs"));
    assert_eq!(
        status_with(&app, &read_only, "GET", &format!("Patient/{patient}"), None).await,
        200
    );
    let body = json!({"resourceType": "Patient", "id": patient, "active": false});
    assert_eq!(
        status_with(
            &app,
            &read_only,
            "PUT",
            &format!("Patient/{patient}"),
            Some(&body)
        )
        .await,
        403
    );
    assert_eq!(
        status_with(
            &app,
            &read_only,
            "DELETE",
            &format!("Patient/{patient}"),
            None
        )
        .await,
        403
    );
    assert_eq!(
        status_with(
            &app,
            &read_only,
            "POST",
            "Patient",
            Some(&json!({"resourceType": "Patient"}))
        )
        .await,
        403
    );
    // A typed scope covers its type only.
    let observations_only = app.token(caller("ehr-system", "system/Observation.rs"));
    assert_eq!(
        status_with(
            &app,
            &observations_only,
            "GET",
            &format!("Patient/{patient}"),
            None
        )
        .await,
        403
    );
    // Malformed scopes grant nothing.
    let malformed = app.token(caller(
        "ehr-system",
        "system/*.sr system/Patient.xyz system/patient.rs",
    ));
    assert_eq!(
        status_with(&app, &malformed, "GET", &format!("Patient/{patient}"), None).await,
        403
    );
    // patient/ scopes without a launch patient grant nothing either.
    let unlaunched = app.token(caller("patient", "patient/*.rs"));
    assert_eq!(
        status_with(
            &app,
            &unlaunched,
            "GET",
            &format!("Patient/{patient}"),
            None
        )
        .await,
        403
    );
    // Nothing was changed by the refused writes.
    let current = app.get_json(&format!("Patient/{patient}"), 200).await;
    assert_eq!(current["meta"]["versionId"], "1");
}
both_backends!(scope_escalation, super::scopes_bound_interactions);

async fn patients_see_only_their_own_compartment(app: TestApp) {
    let (first, second, first_obs, second_obs) = two_patients(&app).await;
    let token = app.token(patient_caller(&first));
    assert_eq!(
        status_with(&app, &token, "GET", &format!("Patient/{first}"), None).await,
        200
    );
    assert_eq!(
        status_with(
            &app,
            &token,
            "GET",
            &format!("Observation/{first_obs}"),
            None
        )
        .await,
        200
    );
    // IDOR: the other patient's records answer like missing ones.
    assert_eq!(
        status_with(&app, &token, "GET", &format!("Patient/{second}"), None).await,
        404
    );
    assert_eq!(
        status_with(
            &app,
            &token,
            "GET",
            &format!("Observation/{second_obs}"),
            None
        )
        .await,
        404
    );
    assert_eq!(
        status_with(
            &app,
            &token,
            "GET",
            &format!("Observation/{second_obs}/_history/1"),
            None
        )
        .await,
        404
    );
    assert_eq!(
        status_with(
            &app,
            &token,
            "GET",
            &format!("Observation/{second_obs}/_history"),
            None
        )
        .await,
        404
    );
    // History bundles hold only what the caller may see.
    let history = json_with(&app, &token, "Observation/_history").await;
    let ids: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first_obs.as_str()]);
    let system = json_with(&app, &token, "_history").await;
    for entry in system["entry"].as_array().unwrap() {
        let text = entry["resource"].to_string();
        assert!(
            !text.contains(&second),
            "system history leaks the other patient: {text}"
        );
    }
    // A patient may not write clinical data, even their own.
    let own_observation = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                 "subject": {"reference": format!("Patient/{first}")}});
    let writer = app.token(DevTokenRequest {
        scope: "launch/patient patient/*.cruds".into(),
        ..patient_caller(&first)
    });
    assert_eq!(
        status_with(&app, &writer, "POST", "Observation", Some(&own_observation)).await,
        403
    );
    // Conditional create cannot probe the other patient's identifiers.
    let probe = app
        .anonymous
        .post(app.url("Observation"))
        .bearer_auth(&writer)
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", format!("_id={second_obs}"))
        .body(own_observation.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 403);
}
both_backends!(
    patient_compartment,
    super::patients_see_only_their_own_compartment
);

async fn practitioners_see_their_care_team(app: TestApp) {
    let (first, second, first_obs, second_obs) = two_patients(&app).await;
    let doctor = app.token(practitioner_caller("doc"));
    assert_eq!(
        status_with(&app, &doctor, "GET", &format!("Patient/{first}"), None).await,
        200
    );
    assert_eq!(
        status_with(
            &app,
            &doctor,
            "GET",
            &format!("Observation/{first_obs}"),
            None
        )
        .await,
        200
    );
    assert_eq!(
        status_with(&app, &doctor, "GET", &format!("Patient/{second}"), None).await,
        404
    );
    assert_eq!(
        status_with(
            &app,
            &doctor,
            "GET",
            &format!("Observation/{second_obs}"),
            None
        )
        .await,
        404
    );
    let stranger = app.token(practitioner_caller("stranger"));
    assert_eq!(
        status_with(&app, &stranger, "GET", &format!("Patient/{first}"), None).await,
        404
    );
    // A practitioner may not delete.
    assert_eq!(
        status_with(
            &app,
            &doctor,
            "DELETE",
            &format!("Observation/{first_obs}"),
            None
        )
        .await,
        403
    );
    // Writing for a patient outside the care team is refused.
    let foreign = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                         "subject": {"reference": format!("Patient/{second}")}});
    assert_eq!(
        status_with(&app, &doctor, "POST", "Observation", Some(&foreign)).await,
        403
    );

    // Restricted data: only with the emergency purpose of use.
    let restricted = json!({"resourceType": "Observation", "status": "final", "code": {"text": "HIV test"},
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]},
        "subject": {"reference": format!("Patient/{first}")}});
    let restricted_id = app.create_id(&restricted).await;
    assert_eq!(
        status_with(
            &app,
            &doctor,
            "GET",
            &format!("Observation/{restricted_id}"),
            None
        )
        .await,
        404
    );
    let emergency = app.token(DevTokenRequest {
        purpose_of_use: Some("ETREAT".into()),
        ..practitioner_caller("doc")
    });
    assert_eq!(
        status_with(
            &app,
            &emergency,
            "GET",
            &format!("Observation/{restricted_id}"),
            None
        )
        .await,
        200
    );
}
both_backends!(care_team, super::practitioners_see_their_care_team);

async fn granular_scopes_filter_resources(app: TestApp) {
    let (first, _, first_obs, _) = two_patients(&app).await;
    let vitals = app
        .create_id(&json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "subject": {"reference": format!("Patient/{first}")}}))
        .await;
    let lab_only = app.token(DevTokenRequest {
        scope: "launch/patient patient/Observation.rs?category=laboratory patient/Patient.rs"
            .into(),
        ..patient_caller(&first)
    });
    assert_eq!(
        status_with(
            &app,
            &lab_only,
            "GET",
            &format!("Observation/{first_obs}"),
            None
        )
        .await,
        200
    );
    assert_eq!(
        status_with(
            &app,
            &lab_only,
            "GET",
            &format!("Observation/{vitals}"),
            None
        )
        .await,
        404
    );
    let history = json_with(&app, &lab_only, "Observation/_history").await;
    assert_eq!(history["entry"].as_array().unwrap().len(), 1);
}
both_backends!(granular_scopes, super::granular_scopes_filter_resources);

/// Roles × interactions × resources, from a table: (role, method, what, expected status).
async fn role_matrix(app: TestApp) {
    let (patient, _, observation, _) = two_patients(&app).await;
    let organization = app
        .create_id(&json!({"resourceType": "Organization", "name": "Clinic"}))
        .await;
    let tokens = [
        (
            "ehr-system",
            app.token(caller("ehr-system", "system/*.cruds")),
        ),
        ("practitioner", app.token(practitioner_caller("doc"))),
        (
            "patient",
            app.token(DevTokenRequest {
                scope: "launch/patient patient/*.cruds".into(),
                ..patient_caller(&patient)
            }),
        ),
        (
            "compliance-officer",
            app.token(caller("compliance-officer", "user/*.cruds")),
        ),
        (
            "admin",
            app.token(caller("admin", "user/*.cruds system/*.cruds")),
        ),
        (
            "nobody",
            app.token(caller("unknown-role", "system/*.cruds")),
        ),
    ];
    let patient_path = format!("Patient/{patient}");
    let observation_path = format!("Observation/{observation}");
    let organization_path = format!("Organization/{organization}");
    let table: &[(&str, &str, &str, u16)] = &[
        ("ehr-system", "GET", &patient_path, 200),
        ("ehr-system", "GET", &observation_path, 200),
        ("ehr-system", "GET", &organization_path, 200),
        ("ehr-system", "GET", "Observation/_history", 200),
        ("practitioner", "GET", &patient_path, 200),
        ("practitioner", "GET", &observation_path, 200),
        ("practitioner", "GET", &organization_path, 200),
        ("practitioner", "DELETE", &organization_path, 403),
        ("patient", "GET", &patient_path, 200),
        ("patient", "GET", &observation_path, 200),
        ("patient", "GET", &organization_path, 404),
        ("patient", "DELETE", &observation_path, 403),
        ("compliance-officer", "GET", &patient_path, 403),
        ("compliance-officer", "GET", &observation_path, 403),
        ("compliance-officer", "GET", "Consent/_history", 200),
        ("admin", "GET", &organization_path, 200),
        ("admin", "GET", &patient_path, 404),
        ("admin", "GET", &observation_path, 404),
        ("nobody", "GET", &patient_path, 403),
        ("nobody", "GET", &organization_path, 403),
    ];
    let mut wrong = Vec::new();
    for (role, method, path, expected) in table {
        let token = &tokens.iter().find(|(name, _)| name == role).unwrap().1;
        let actual = status_with(&app, token, method, path, None).await;
        if actual != *expected {
            wrong.push(format!(
                "{role} {method} {path}: expected {expected}, got {actual}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
both_backends!(matrix, super::role_matrix);

/// Tokens from a real OpenID provider (npm oidc-provider): discovered, keys from its JWKS,
/// client_credentials with a secret and with private_key_jwt, user tokens with fhirUser; and the
/// ways such tokens must fail.
async fn tokens_from_a_real_identity_provider(backend: crate::helpers::Backend) {
    const AUDIENCE: &str = "urn:custodian:test-oidc";
    let Some(oidc) = crate::oidc::OidcProvider::start(&[AUDIENCE, "urn:other:server"]).await else {
        return;
    };
    let issuer = oidc.issuer().to_string();
    let Some(app) = crate::helpers::spawn_app_with(backend, |settings| {
        settings.auth.dev_issuer = custodian::config::DevIssuerMode::Off;
        settings.auth.issuers = issuer;
        settings.auth.audience = Some(AUDIENCE.into());
    })
    .await
    else {
        return;
    };
    // The dev issuer is off: the suite's default token is refused.
    assert_eq!(app.get("Patient/x").await.status(), 401);

    let secret_token = oidc.client_secret_token("system/*.cruds", AUDIENCE).await;
    let id = {
        let response = app
            .anonymous
            .post(app.url("Patient"))
            .bearer_auth(&secret_token)
            .header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Patient", "generalPractitioner": [{"reference": "Practitioner/oidc-doc"}]}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let path = format!("Patient/{id}");
    let jwt_token = oidc.private_key_jwt_token("system/*.rs", AUDIENCE).await;
    assert_eq!(status_with(&app, &jwt_token, "GET", &path, None).await, 200);
    assert_eq!(
        status_with(&app, &jwt_token, "DELETE", &path, None).await,
        403,
        "read-only scopes"
    );

    let doctor = oidc
        .mint(json!({"sub": "doc", "roles": ["practitioner"], "fhirUser": "Practitioner/oidc-doc", "scope": "openid fhirUser user/*.cruds"}))
        .await;
    assert_eq!(status_with(&app, &doctor, "GET", &path, None).await, 200);
    let other_doctor = oidc
        .mint(json!({"sub": "doc2", "roles": ["practitioner"], "fhirUser": "Practitioner/other", "scope": "user/*.cruds"}))
        .await;
    assert_eq!(
        status_with(&app, &other_doctor, "GET", &path, None).await,
        404
    );

    let refused = [
        ("another audience", oidc.client_secret_token("system/*.cruds", "urn:other:server").await),
        ("expired", oidc.mint(json!({"sub": "x", "roles": ["ehr-system"], "scope": "system/*.cruds", "expires_in": -120})).await),
        ("not yet valid", oidc.mint(json!({"sub": "x", "roles": ["ehr-system"], "scope": "system/*.cruds", "nbf_offset": 600})).await),
        ("another tenant", oidc.mint(json!({"sub": "x", "roles": ["ehr-system"], "scope": "system/*.cruds", "tenant": "elsewhere"})).await),
    ];
    for (case, token) in &refused {
        assert_eq!(
            status_with(&app, token, "GET", &path, None).await,
            401,
            "{case}"
        );
    }
    // A kid the issuer never published: refused, and the JWKS refetch is rate-limited.
    let parts: Vec<&str> = secret_token.split('.').collect();
    let header = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut header: Value = serde_json::from_slice(&engine.decode(parts[0]).unwrap()).unwrap();
        header["kid"] = json!("no-such-key");
        engine.encode(header.to_string())
    };
    let unknown_kid = format!("{header}.{}.{}", parts[1], parts[2]);
    assert_eq!(
        status_with(&app, &unknown_kid, "GET", &path, None).await,
        401
    );

    // SMART configuration names the provider's real endpoints.
    let smart = app
        .anonymous
        .get(app.url(".well-known/smart-configuration"))
        .send()
        .await
        .unwrap();
    let smart: Value = smart.json().await.unwrap();
    assert_eq!(smart["issuer"], oidc.issuer());
    assert!(smart["token_endpoint"]
        .as_str()
        .unwrap()
        .starts_with(oidc.issuer()));
    assert!(smart["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|capability| capability == "permission-v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_sqlite() {
    tokens_from_a_real_identity_provider(crate::helpers::Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_postgres() {
    tokens_from_a_real_identity_provider(crate::helpers::Backend::Postgres).await;
}
