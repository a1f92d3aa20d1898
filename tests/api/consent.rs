//! Patient consent enforced at access time, and break-the-glass, through the real server.
//!
//! A scenario matrix, driven from a table: each scenario stores some Consents for one patient
//! and states, for each caller, exactly which of the patient's resources that caller sees. Each
//! expectation is checked on read, on search (entries and `_total`, across page boundaries), on
//! `_include`, on `Patient/$everything`, and on history.

use std::collections::BTreeSet;

use custodian::authz::dev::DevTokenRequest;
use serde_json::{json, Value};

use crate::authz::{caller, patient_caller, practitioner_caller};
use crate::both_backends;
use crate::helpers::{spawn_app_with, Backend, TestApp, FHIR_JSON};

const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

fn token_request(subject: &str, role: &str, scope: &str) -> DevTokenRequest {
    DevTokenRequest {
        subject: subject.to_string(),
        ..caller(role, scope)
    }
}

fn practitioner(id: &str) -> DevTokenRequest {
    DevTokenRequest {
        subject: id.to_string(),
        ..practitioner_caller(id)
    }
}

fn patient(id: &str) -> DevTokenRequest {
    DevTokenRequest {
        scope: "launch/patient patient/*.cruds".into(),
        ..patient_caller(id)
    }
}

fn compliance_officer() -> DevTokenRequest {
    token_request(
        "auditor",
        "compliance-officer",
        "user/AuditEvent.rs user/Consent.rs",
    )
}

/// One HTTP call with a token (and optional extra header); the status and the JSON body.
async fn call(
    app: &TestApp,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    header: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut request = app
        .anonymous
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request
            .header("content-type", FHIR_JSON)
            .body(body.to_string());
    }
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The patient's world: one patient, their resources, and the callers around them.
struct World {
    patient: String,
    /// Resource key (`lab`, `sensitive`, …) → `Type/id`.
    resources: Vec<(&'static str, String)>,
}

impl World {
    fn reference(&self, key: &str) -> &str {
        &self
            .resources
            .iter()
            .find(|(name, _)| *name == key)
            .unwrap()
            .1
    }

    fn key_of(&self, reference: &str) -> Option<&'static str> {
        self.resources
            .iter()
            .find(|(_, stored)| stored == reference)
            .map(|(name, _)| *name)
    }
}

/// Practitioners doc, nurse and orgdoc are all on the patient's care team (generalPractitioner);
/// nurse is also a participant of CareTeam/team; orgdoc works for Organization/org1 through a
/// PractitionerRole.
async fn build_world(app: &TestApp) -> World {
    for (path, resource) in [
        (
            "Organization/org1",
            json!({"resourceType": "Organization", "id": "org1", "name": "Clinic One"}),
        ),
        (
            "PractitionerRole/role1",
            json!({"resourceType": "PractitionerRole", "id": "role1", "active": true,
                   "practitioner": {"reference": "Practitioner/orgdoc"},
                   "organization": {"reference": "Organization/org1"}}),
        ),
    ] {
        let response = app.put(path, &resource).await;
        let status = response.status();
        assert!(
            status.is_success(),
            "PUT {path}: {status} {}",
            response.text().await.unwrap()
        );
    }
    let patient = app
        .create_id(&json!({"resourceType": "Patient", "generalPractitioner": [
            {"reference": "Practitioner/doc"}, {"reference": "Practitioner/nurse"},
            {"reference": "Practitioner/orgdoc"}]}))
        .await;
    let subject = json!({"reference": format!("Patient/{patient}")});
    let observation = |code: &str, date: &str| {
        json!({"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
               "subject": subject, "effectiveDateTime": date})
    };
    let mut sensitive = observation("5678-9", "2022-04-01");
    sensitive["meta"] = json!({"security": [{"system": ACT_CODE, "code": "SCA"}]});
    let team = json!({"resourceType": "CareTeam", "id": "team", "status": "active", "subject": subject,
        "participant": [{"member": {"reference": "Practitioner/nurse"}}]});
    assert!(app.put("CareTeam/team", &team).await.status().is_success());
    let mut resources = vec![("patient", format!("Patient/{patient}"))];
    for (key, resource) in [
        ("lab", observation("1234-5", "2020-06-15")),
        ("sensitive", sensitive),
        ("recent", observation("1234-5", "2025-03-01")),
        (
            "condition",
            json!({"resourceType": "Condition", "subject": subject, "onsetDateTime": "2019-02-02",
                   "code": {"text": "asthma"}}),
        ),
    ] {
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        let id = app.create_id(&resource).await;
        resources.push((key, format!("{resource_type}/{id}")));
    }
    World { patient, resources }
}

fn role_coding() -> Value {
    json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]})
}

fn actor(reference: &str) -> Value {
    json!({"role": role_coding(), "reference": {"reference": reference}})
}

/// A patient-privacy Consent of the world's patient with this provision.
fn consent(world: &World, provision: Value) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{}", world.patient)},
        "dateTime": "2026-01-01T00:00:00Z",
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": provision,
    })
}

fn days_from_now(days: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}

/// What one caller sees of the patient's resources.
type Sees = BTreeSet<&'static str>;

fn all() -> Sees {
    ["patient", "lab", "sensitive", "recent", "condition"]
        .into_iter()
        .collect()
}

fn all_but(hidden: &[&str]) -> Sees {
    all()
        .into_iter()
        .filter(|key| !hidden.contains(key))
        .collect()
}

fn none() -> Sees {
    Sees::new()
}

/// The callers every scenario states an expectation for.
const CALLERS: [&str; 4] = ["doc", "nurse", "orgdoc", "ehr"];

struct Scenario {
    name: &'static str,
    provisions: Vec<Value>,
    /// What doc, nurse, orgdoc and the EHR system see, in that order.
    sees: [Sees; 4],
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "opt-out default: no Consent, everyone on the care team sees everything",
            provisions: vec![],
            sees: [all(), all(), all(), all()],
        },
        Scenario {
            name: "deny one practitioner",
            provisions: vec![json!({"type": "deny", "actor": [actor("Practitioner/doc")]})],
            sees: [none(), all(), all(), all()],
        },
        Scenario {
            name: "deny an organization",
            provisions: vec![json!({"type": "deny", "actor": [actor("Organization/org1")]})],
            sees: [all(), all(), none(), all()],
        },
        Scenario {
            name: "deny sensitive labels except for the care team",
            provisions: vec![json!({"type": "permit", "provision": [{
                "type": "deny",
                "securityLabel": [{"system": ACT_CODE, "code": "SCA"}],
                "provision": [{"type": "permit", "actor": [actor("CareTeam/team")]}]
            }]})],
            sees: [
                all_but(&["sensitive"]),
                all(),
                all_but(&["sensitive"]),
                all_but(&["sensitive"]),
            ],
        },
        Scenario {
            name: "time-bound permit: doc's is current, nurse's has expired",
            provisions: vec![json!({"type": "deny", "provision": [
                {"type": "permit", "actor": [actor("Practitioner/doc")],
                 "period": {"start": days_from_now(-1), "end": days_from_now(1)}},
                {"type": "permit", "actor": [actor("Practitioner/nurse")],
                 "period": {"start": "2020-01-01", "end": days_from_now(-2)}}
            ]})],
            sees: [all(), none(), none(), none()],
        },
        Scenario {
            name: "dataPeriod restriction: nothing from before 2022 (undated data withheld)",
            provisions: vec![json!({"type": "permit", "provision": [
                {"type": "deny", "dataPeriod": {"end": "2021-12-31"}}
            ]})],
            sees: [
                all_but(&["lab", "condition", "patient"]),
                all_but(&["lab", "condition", "patient"]),
                all_but(&["lab", "condition", "patient"]),
                all_but(&["lab", "condition", "patient"]),
            ],
        },
        Scenario {
            name: "nested exception: deny all but the care team, and not their Conditions",
            provisions: vec![json!({"type": "deny", "provision": [{
                "type": "permit", "actor": [actor("CareTeam/team")],
                "provision": [{"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]}]
            }]})],
            sees: [none(), all_but(&["condition"]), none(), none()],
        },
        Scenario {
            name: "newest wins: a later permit for orgdoc over an older deny for everyone",
            provisions: vec![
                json!({"type": "deny"}),
                json!({"type": "permit", "actor": [actor("Practitioner/orgdoc")]}),
            ],
            sees: [none(), none(), all(), none()],
        },
    ]
}

/// Every way `token` can reach the patient's resources agrees with `expected`.
async fn check_sees(app: &TestApp, world: &World, token: &str, expected: &Sees, context: &str) {
    // Read.
    for (key, reference) in &world.resources {
        let (status, _) = call(app, token, "GET", reference, None, None).await;
        let wanted = if expected.contains(key) { 200 } else { 404 };
        assert_eq!(status, wanted, "{context}: read {key}");
    }
    // Search across pages: entries and _total.
    let patient = &world.patient;
    let mut path = format!("Observation?subject=Patient/{patient}&_count=1&_total=accurate");
    let mut found = Sees::new();
    let mut total = None;
    for _ in 0..10 {
        let (status, bundle) = call(app, token, "GET", &path, None, None).await;
        assert_eq!(status, 200, "{context}: search");
        total.get_or_insert(bundle["total"].as_u64());
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let reference = format!(
                "Observation/{}",
                entry["resource"]["id"].as_str().unwrap_or_default()
            );
            found.insert(world.key_of(&reference).expect("a known resource"));
        }
        let next = bundle["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|link| link["relation"] == "next")
            .and_then(|link| link["url"].as_str());
        match next {
            Some(url) => path = url.trim_start_matches(&app.base_url).to_string(),
            None => break,
        }
    }
    let observations: Sees = expected
        .iter()
        .copied()
        .filter(|key| world.reference(key).starts_with("Observation/"))
        .collect();
    assert_eq!(found, observations, "{context}: search entries");
    assert_eq!(
        total.flatten(),
        Some(observations.len() as u64),
        "{context}: _total"
    );
    // _include: the Patient comes along only when visible.
    let (_, bundle) = call(
        app,
        token,
        "GET",
        &format!("Observation?subject=Patient/{patient}&_include=Observation:subject"),
        None,
        None,
    )
    .await;
    let included = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|entry| entry["search"]["mode"] == "include");
    assert_eq!(
        included,
        expected.contains("patient") && !observations.is_empty(),
        "{context}: _include of the Patient"
    );
    // $everything: the Patient must be visible, and then exactly the visible resources come.
    let (status, bundle) = call(
        app,
        token,
        "GET",
        &format!("Patient/{patient}/$everything?_count=500"),
        None,
        None,
    )
    .await;
    if expected.contains("patient") {
        assert_eq!(status, 200, "{context}: $everything");
        let everything: Sees = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let resource = &entry["resource"];
                world.key_of(&format!(
                    "{}/{}",
                    resource["resourceType"].as_str().unwrap_or_default(),
                    resource["id"].as_str().unwrap_or_default()
                ))
            })
            .collect();
        assert_eq!(&everything, expected, "{context}: $everything entries");
    } else {
        assert_eq!(status, 404, "{context}: $everything of a hidden Patient");
    }
    // History of the Condition: its versions are the Condition.
    let (status, _) = call(
        app,
        token,
        "GET",
        &format!("{}/_history", world.reference("condition")),
        None,
        None,
    )
    .await;
    let wanted = if expected.contains("condition") {
        200
    } else {
        404
    };
    assert_eq!(status, wanted, "{context}: history of the Condition");
}

async fn consent_scenarios(app: TestApp) {
    let world = build_world(&app).await;
    let tokens: Vec<String> = CALLERS
        .iter()
        .map(|caller| match *caller {
            "ehr" => app.token(token_request("ehr", "ehr-system", "system/*.cruds")),
            id => app.token(practitioner(id)),
        })
        .collect();
    let patient_token = app.token(patient(&world.patient));
    for scenario in scenarios() {
        let mut stored = Vec::new();
        for (index, provision) in scenario.provisions.iter().enumerate() {
            let mut body = consent(&world, provision.clone());
            // Later Consents in the list are newer.
            body["dateTime"] = json!(format!("2026-01-0{}T00:00:00Z", index + 1));
            let (status, created) =
                call(&app, &patient_token, "POST", "Consent", Some(&body), None).await;
            assert_eq!(
                status, 201,
                "{}: the patient records a Consent: {created}",
                scenario.name
            );
            stored.push(created["id"].as_str().unwrap().to_string());
        }
        for ((caller, token), expected) in CALLERS.iter().zip(&tokens).zip(&scenario.sees) {
            check_sees(
                &app,
                &world,
                token,
                expected,
                &format!("{} / {caller}", scenario.name),
            )
            .await;
        }
        // The patient always sees their whole record, whatever they decided for others.
        check_sees(
            &app,
            &world,
            &patient_token,
            &all(),
            &format!("{} / the patient", scenario.name),
        )
        .await;
        // Withdrawal (delete) takes effect on the next request.
        for id in stored {
            let (status, _) = call(
                &app,
                &patient_token,
                "DELETE",
                &format!("Consent/{id}"),
                None,
                None,
            )
            .await;
            assert_eq!(status, 204, "{}: withdraw", scenario.name);
        }
    }
}
both_backends!(scenario_matrix, super::consent_scenarios);

async fn withdrawal_mid_session_and_audit(app: TestApp) {
    let world = build_world(&app).await;
    let doc = app.token(practitioner("doc"));
    let patient_token = app.token(patient(&world.patient));
    let lab = world.reference("lab").to_string();
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 200);
    let body = consent(
        &world,
        json!({"type": "deny", "actor": [actor("Practitioner/doc")]}),
    );
    let (status, created) = call(&app, &patient_token, "POST", "Consent", Some(&body), None).await;
    assert_eq!(status, 201);
    let consent_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 404);

    // The denied read's AuditEvent names the Consent that decided.
    let auditor = app.token(compliance_officer());
    let lab_id = lab.split('/').nth(1).unwrap();
    let (status, events) = call(
        &app,
        &auditor,
        "GET",
        &format!("AuditEvent?entity=Observation/{lab_id}&outcome=4"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{events}");
    let decided = events["entry"].as_array().unwrap().iter().any(|entry| {
        entry["resource"]["entity"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|entity| {
                entity["what"]["reference"] == format!("Consent/{consent_id}/_history/1")
                    && entity["description"] == "consent decision: deny"
            })
    });
    assert!(
        decided,
        "the AuditEvent names the deciding Consent: {events}"
    );

    // Withdrawal by update to inactive: the next request of the same token sees again.
    let mut withdrawn = created.clone();
    withdrawn["status"] = json!("inactive");
    let (status, _) = call(
        &app,
        &patient_token,
        "PUT",
        &format!("Consent/{consent_id}"),
        Some(&withdrawn),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 200);
    // History keeps both versions of the directive.
    let (status, history) = call(
        &app,
        &patient_token,
        "GET",
        &format!("Consent/{consent_id}/_history"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(history["entry"].as_array().unwrap().len(), 2);
    // The practitioner can read the Consent itself: directives are never hidden by consent.
    assert_eq!(
        call(
            &app,
            &doc,
            "GET",
            &format!("Consent/{consent_id}"),
            None,
            None
        )
        .await
        .0,
        200
    );
}
both_backends!(
    withdrawal_mid_session,
    super::withdrawal_mid_session_and_audit
);

async fn consents_are_validated_and_owned(app: TestApp) {
    let world = build_world(&app).await;
    let other = app.create_id(&json!({"resourceType": "Patient"})).await;
    let patient_token = app.token(patient(&world.patient));
    let invalid = [
        json!({"type": "sometimes"}),
        json!({"type": "deny", "period": {"start": "2024-01-01", "end": "2023-01-01"}}),
        json!({"type": "deny", "actor": [{"reference": {"reference": "Practitioner/doc"}}]}),
        json!({"type": "deny", "actor": [actor("Observation/x")]}),
    ];
    for provision in invalid {
        let body = consent(&world, provision.clone());
        let (status, outcome) =
            call(&app, &patient_token, "POST", "Consent", Some(&body), None).await;
        assert!(
            status == 422 || status == 400,
            "{provision}: {status} {outcome}"
        );
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    let mut no_provision = consent(&world, json!({}));
    no_provision.as_object_mut().unwrap().remove("provision");
    no_provision["policyRule"]["coding"][0]["code"] = json!("HIPAA-Auth");
    let (status, outcome) = call(
        &app,
        &patient_token,
        "POST",
        "Consent",
        Some(&no_provision),
        None,
    )
    .await;
    assert_eq!(status, 422, "{outcome}");
    assert!(
        outcome.to_string().contains("provision is required"),
        "{outcome}"
    );
    // Nothing of the refused Consents was stored.
    let (_, found) = call(
        &app,
        &patient_token,
        "GET",
        "Consent?_total=accurate",
        None,
        None,
    )
    .await;
    assert_eq!(found["total"], 0, "{found}");
    // A patient records Consents for their own record only.
    let mut foreign = consent(&world, json!({"type": "deny"}));
    foreign["patient"] = json!({"reference": format!("Patient/{other}")});
    assert_eq!(
        call(
            &app,
            &patient_token,
            "POST",
            "Consent",
            Some(&foreign),
            None
        )
        .await
        .0,
        403
    );
    // A practitioner of the care team may record one on the patient's behalf.
    let doc = app.token(practitioner("doc"));
    let behalf = consent(
        &world,
        json!({"type": "deny", "actor": [actor("Practitioner/nurse")]}),
    );
    assert_eq!(
        call(&app, &doc, "POST", "Consent", Some(&behalf), None)
            .await
            .0,
        201
    );
    let nurse = app.token(practitioner("nurse"));
    assert_eq!(
        call(&app, &nurse, "GET", world.reference("lab"), None, None)
            .await
            .0,
        404
    );
}
both_backends!(
    validation_and_ownership,
    super::consents_are_validated_and_owned
);

async fn spawn_with_short_break_glass(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |settings| settings.consent.break_glass_secs = 4).await
}

async fn break_the_glass(app: TestApp) {
    let world = build_world(&app).await;
    let patient_token = app.token(patient(&world.patient));
    let body = consent(
        &world,
        json!({"type": "deny", "actor": [actor("Practitioner/doc")]}),
    );
    assert_eq!(
        call(&app, &patient_token, "POST", "Consent", Some(&body), None)
            .await
            .0,
        201
    );
    let doc = app.token(practitioner("doc"));
    let lab = world.reference("lab").to_string();
    let emergency = Some((
        "X-Break-Glass",
        "patient unresponsive in the emergency room",
    ));

    // Denied as before without a declaration, or with a blank reason.
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 404);
    let (status, outcome) = call(
        &app,
        &doc,
        "GET",
        &lab,
        None,
        Some(("X-Break-Glass", "   ")),
    )
    .await;
    assert_eq!(status, 403, "{outcome}");
    // A role the policy does not let break the glass is refused.
    let ehr = app.token(token_request("ehr", "ehr-system", "system/*.cruds"));
    assert_eq!(call(&app, &ehr, "GET", &lab, None, emergency).await.0, 403);

    // The practitioner with a reason: the data, and an emergency-override AuditEvent.
    let (status, observation) = call(&app, &doc, "GET", &lab, None, emergency).await;
    assert_eq!(status, 200, "{observation}");
    let (status, bundle) = call(
        &app,
        &doc,
        "GET",
        &format!(
            "Observation?subject=Patient/{}&_total=accurate",
            world.patient
        ),
        None,
        emergency,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        bundle["total"], 3,
        "search under break-the-glass sees all three"
    );

    let auditor = app.token(compliance_officer());
    let lab_id = lab.split('/').nth(1).unwrap();
    let (_, events) = call(
        &app,
        &auditor,
        "GET",
        &format!("AuditEvent?entity=Observation/{lab_id}&outcome=0"),
        None,
        None,
    )
    .await;
    let override_event = events["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| &entry["resource"])
        .find(|event| {
            let subtype = event["subtype"].as_array().unwrap();
            subtype[0]["code"] == "read" && subtype.iter().any(|coding| coding["code"] == "110127")
        })
        .unwrap_or_else(|| panic!("an emergency-override AuditEvent: {events}"));
    assert_eq!(
        override_event["purposeOfEvent"][0]["coding"][0]["code"],
        "ETREAT"
    );
    let text = override_event.to_string();
    assert!(
        !text.contains("unresponsive"),
        "the reason stays out of the audit trail: {text}"
    );
    assert!(text.contains("consent denies overridden: 1"), "{text}");

    // The compliance listing shows the session with its reason; a review is recorded.
    let (status, listing) = call(&app, &auditor, "GET", "_audit/break-glass", None, None).await;
    assert_eq!(status, 200, "{listing}");
    let session = &listing["sessions"][0];
    assert_eq!(
        session["reason"],
        "patient unresponsive in the emergency room"
    );
    assert_eq!(session["fhirUser"], "Practitioner/doc");
    assert_eq!(session["status"], "unreviewed");
    assert_eq!(session["requests"], 2, "{session}");
    assert!(
        session["consentDeniesOverridden"].as_u64().unwrap() >= 2,
        "{session}"
    );
    let session_id = session["session"].as_str().unwrap().to_string();
    let review = json!({"status": "justified", "note": "confirmed with the ER lead"});
    let (status, _) = call(
        &app,
        &auditor,
        "POST",
        &format!("_audit/break-glass/{session_id}/review"),
        Some(&review),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let bad_review = json!({"status": "fine"});
    let (status, _) = call(
        &app,
        &auditor,
        "POST",
        &format!("_audit/break-glass/{session_id}/review"),
        Some(&bad_review),
        None,
    )
    .await;
    assert_eq!(status, 422);
    // The practitioner may neither list nor review (no audit-trail access).
    assert_eq!(
        call(&app, &doc, "GET", "_audit/break-glass", None, None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &app,
            &doc,
            "POST",
            &format!("_audit/break-glass/{session_id}/review"),
            Some(&review),
            None
        )
        .await
        .0,
        403
    );
    let (_, listing) = call(
        &app,
        &auditor,
        "GET",
        "_audit/break-glass?status=justified",
        None,
        None,
    )
    .await;
    assert_eq!(listing["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(
        listing["sessions"][0]["reviews"][0]["note"],
        "confirmed with the ER lead"
    );
    let (_, listing) = call(
        &app,
        &auditor,
        "GET",
        "_audit/break-glass?status=unreviewed",
        None,
        None,
    )
    .await;
    assert_eq!(listing["sessions"].as_array().unwrap().len(), 0);

    // After the time box the same token is refused; a new sign-in opens a new session.
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    let (status, outcome) = call(&app, &doc, "GET", &lab, None, emergency).await;
    assert_eq!(status, 403, "{outcome}");
    assert!(
        outcome.to_string().contains("session has closed"),
        "{outcome}"
    );
    let fresh = app.token(DevTokenRequest {
        lifetime_secs: 601,
        ..practitioner("doc")
    });
    assert_eq!(
        call(&app, &fresh, "GET", &lab, None, emergency).await.0,
        200
    );
    let (_, listing) = call(&app, &auditor, "GET", "_audit/break-glass", None, None).await;
    assert_eq!(listing["sessions"].as_array().unwrap().len(), 2);
}

mod break_glass {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let app = spawn_with_short_break_glass(Backend::Sqlite).await.unwrap();
        break_the_glass(app).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(app) = spawn_with_short_break_glass(Backend::Postgres).await {
            break_the_glass(app).await;
        }
    }
}

async fn opt_in_jurisdiction(app: TestApp) {
    let world = build_world(&app).await;
    let doc = app.token(practitioner("doc"));
    let lab = world.reference("lab").to_string();
    // Without any Consent nobody but the patient sees the record.
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 404);
    let patient_token = app.token(patient(&world.patient));
    assert_eq!(
        call(&app, &patient_token, "GET", &lab, None, None).await.0,
        200
    );
    let body = consent(
        &world,
        json!({"type": "permit", "actor": [actor("Practitioner/doc")]}),
    );
    assert_eq!(
        call(&app, &patient_token, "POST", "Consent", Some(&body), None)
            .await
            .0,
        201
    );
    assert_eq!(call(&app, &doc, "GET", &lab, None, None).await.0, 200);
    let nurse = app.token(practitioner("nurse"));
    assert_eq!(call(&app, &nurse, "GET", &lab, None, None).await.0, 404);
}

mod opt_in {
    use super::*;

    async fn spawn(backend: Backend) -> Option<TestApp> {
        spawn_app_with(backend, |settings| {
            settings.consent.default_decision = custodian::consent::Verdict::Deny;
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        opt_in_jurisdiction(spawn(Backend::Sqlite).await.unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if let Some(app) = spawn(Backend::Postgres).await {
            opt_in_jurisdiction(app).await;
        }
    }
}

/// Erasure is the one thing that lets a Consent's `(id, version)` be written again: a patient
/// erased and re-created under the same ids, with a Consent of the same id and version that now
/// denies, must be judged by the new directive. A cache keyed by id and version alone would keep
/// serving the erased patient's permit (and fail open).
async fn consent_caches_do_not_outlive_erasure(app: TestApp) {
    let doc = app.token(practitioner("doc"));
    let officer = app.token(compliance_officer_who_erases());
    let lab = "Observation/reborn-lab";
    for round in ["permit", "deny"] {
        let patient = json!({"resourceType": "Patient", "id": "reborn",
            "generalPractitioner": [{"reference": "Practitioner/doc"}]});
        assert_eq!(
            app.put("Patient/reborn", &patient).await.status(),
            201,
            "{round}"
        );
        let observation = json!({"resourceType": "Observation", "id": "reborn-lab",
            "status": "final", "code": {"text": "lab"},
            "subject": {"reference": "Patient/reborn"}});
        assert_eq!(app.put(lab, &observation).await.status(), 201, "{round}");
        let world = World {
            patient: "reborn".into(),
            resources: Vec::new(),
        };
        let mut directive = consent(
            &world,
            json!({"type": round, "actor": [actor("Practitioner/doc")]}),
        );
        directive["id"] = json!("reborn-consent");
        let response = app.put("Consent/reborn-consent", &directive).await;
        assert_eq!(
            response.status(),
            201,
            "{round}: the Consent is version 1 again"
        );
        let expected = if round == "permit" { 200 } else { 404 };
        assert_eq!(
            call(&app, &doc, "GET", lab, None, None).await.0,
            expected,
            "{round}"
        );
        let (status, receipt) =
            call(&app, &officer, "POST", "Patient/reborn/$erase", None, None).await;
        assert_eq!(status, 200, "{round}: {receipt}");
    }
}
both_backends!(
    caches_and_erasure,
    super::consent_caches_do_not_outlive_erasure
);

fn compliance_officer_who_erases() -> DevTokenRequest {
    token_request(
        "eraser",
        "compliance-officer",
        "user/AuditEvent.rs user/Patient.d",
    )
}
