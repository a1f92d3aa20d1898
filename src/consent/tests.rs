//! Unit tests of directive compilation, evaluation and validation.

use super::*;
use serde_json::json;

const PRIVACY: &str = "http://terminology.hl7.org/CodeSystem/consentscope";

fn consent(provision: Value) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": PRIVACY, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2026-01-01T00:00:00Z",
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision,
    })
}

fn actor(reference: &str) -> Value {
    json!({"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
           "reference": {"reference": reference}})
}

fn directive(id: &str, value: &Value) -> Directive {
    Directive::compile(id, 1, value).expect("compiles")
}

struct Ask<'a> {
    caller: &'a [&'a str],
    resource: Value,
    purpose: Option<&'a str>,
    action: ConsentAction,
}

fn ask(directives: &[Directive], ask: Ask<'_>) -> Decision {
    let caller: HashSet<String> = ask.caller.iter().map(|s| s.to_string()).collect();
    let request = AccessRequest {
        action: ask.action,
        purpose: ask.purpose,
        caller: &caller,
        resource_type: ask.resource["resourceType"].as_str().unwrap(),
        resource_id: ask.resource["id"].as_str(),
        resource: Some(&ask.resource),
        now: Utc::now(),
    };
    decide(directives, &request, Verdict::Permit)
}

fn read_by<'a>(caller: &'a [&'a str], resource: Value) -> Ask<'a> {
    Ask {
        caller,
        resource,
        purpose: None,
        action: ConsentAction::Access,
    }
}

fn observation() -> Value {
    json!({"resourceType": "Observation", "id": "o1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
           "effectiveDateTime": "2020-06-15"})
}

#[test]
fn a_deny_naming_one_practitioner_stops_only_that_practitioner() {
    let directives = [directive(
        "c1",
        &consent(json!({"type": "deny", "actor": [actor("Practitioner/bad")]})),
    )];
    let denied = ask(&directives, read_by(&["Practitioner/bad"], observation()));
    assert_eq!(denied.verdict, Verdict::Deny);
    assert_eq!(denied.decided_by.as_deref(), Some("Consent/c1/_history/1"));
    let other = ask(&directives, read_by(&["Practitioner/good"], observation()));
    assert_eq!(other.verdict, Verdict::Permit);
    assert_eq!(
        other.decided_by, None,
        "the default decides what the consent does not cover"
    );
}

#[test]
fn nested_provisions_are_exceptions_and_deny_wins_among_siblings() {
    // Deny everyone, except the care team may see everything but psychiatry notes.
    let value = consent(json!({
        "type": "deny",
        "provision": [{
            "type": "permit",
            "actor": [actor("CareTeam/team")],
            "provision": [{"securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]}]
        }]
    }));
    let directives = [directive("c1", &value)];
    let team = ["CareTeam/team", "Practitioner/a"];
    assert_eq!(
        ask(&directives, read_by(&team, observation())).verdict,
        Verdict::Permit
    );
    assert_eq!(
        ask(&directives, read_by(&["Practitioner/x"], observation())).verdict,
        Verdict::Deny
    );
    let mut psych = observation();
    psych["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]});
    assert_eq!(
        ask(&directives, read_by(&team, psych)).verdict,
        Verdict::Deny,
        "a typeless nested provision is the opposite of its parent"
    );
}

#[test]
fn periods_bound_provisions_and_data_periods_bound_the_data() {
    let expired = consent(json!({"type": "deny", "provision": [{
        "type": "permit", "actor": [actor("Practitioner/a")],
        "period": {"start": "2020-01-01", "end": "2021-01-01"}}]}));
    let directives = [directive("c1", &expired)];
    assert_eq!(
        ask(&directives, read_by(&["Practitioner/a"], observation())).verdict,
        Verdict::Deny
    );

    let old_data_hidden = consent(json!({"type": "permit", "provision": [{
        "type": "deny", "dataPeriod": {"end": "2021-01-01"}}]}));
    let directives = [directive("c2", &old_data_hidden)];
    assert_eq!(
        ask(&directives, read_by(&[], observation())).verdict,
        Verdict::Deny
    );
    let mut recent = observation();
    recent["effectiveDateTime"] = json!("2024-02-02T10:00:00Z");
    assert_eq!(
        ask(&directives, read_by(&[], recent)).verdict,
        Verdict::Permit
    );
    // No clinical date: a deny that cannot be judged applies (fail closed).
    let undated = json!({"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "x"}});
    assert_eq!(
        ask(&directives, read_by(&[], undated)).verdict,
        Verdict::Deny
    );
}

#[test]
fn class_code_purpose_action_and_data_criteria() {
    let value = consent(json!({"type": "permit", "provision": [
        {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]},
        {"type": "deny", "code": [{"coding": [{"system": "http://loinc.org", "code": "1234-5"}]}], "purpose": [{"code": "HMARKT"}]},
        {"type": "deny", "action": [{"coding": [{"code": "correct"}]}], "actor": [actor("Practitioner/a")]},
        {"type": "deny", "data": [{"meaning": "related", "reference": {"reference": "Encounter/e9"}}]}
    ]}));
    let directives = [directive("c1", &value)];
    let condition =
        json!({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p1"}});
    assert_eq!(
        ask(&directives, read_by(&[], condition)).verdict,
        Verdict::Deny
    );
    assert_eq!(
        ask(&directives, read_by(&[], observation())).verdict,
        Verdict::Permit
    );
    let marketing = Ask {
        purpose: Some("HMARKT"),
        ..read_by(&[], observation())
    };
    assert_eq!(ask(&directives, marketing).verdict, Verdict::Deny);
    let correcting = Ask {
        action: ConsentAction::Correct,
        ..read_by(&["Practitioner/a"], observation())
    };
    assert_eq!(ask(&directives, correcting).verdict, Verdict::Deny);
    assert_eq!(
        ask(&directives, read_by(&["Practitioner/a"], observation())).verdict,
        Verdict::Permit
    );
    let mut linked = observation();
    linked["encounter"] = json!({"reference": "https://other.example/fhir/Encounter/e9"});
    assert_eq!(
        ask(&directives, read_by(&[], linked)).verdict,
        Verdict::Deny
    );
}

#[test]
fn the_newest_applicable_consent_wins() {
    let mut older = consent(json!({"type": "deny"}));
    older["dateTime"] = json!("2025-01-01");
    let mut newer = consent(json!({"type": "permit", "actor": [actor("Practitioner/a")]}));
    newer["dateTime"] = json!("2026-05-01");
    let directives = [directive("old", &older), directive("new", &newer)];
    let for_a = ask(&directives, read_by(&["Practitioner/a"], observation()));
    assert_eq!(
        (for_a.verdict, for_a.decided_by.as_deref()),
        (Verdict::Permit, Some("Consent/new/_history/1"))
    );
    // The newer one does not speak about b: the older deny decides.
    let for_b = ask(&directives, read_by(&["Practitioner/b"], observation()));
    assert_eq!(
        (for_b.verdict, for_b.decided_by.as_deref()),
        (Verdict::Deny, Some("Consent/old/_history/1"))
    );
}

#[test]
fn only_active_privacy_consents_take_part() {
    let mut withdrawn = consent(json!({"type": "deny"}));
    withdrawn["status"] = json!("inactive");
    assert!(Directive::compile("w", 2, &withdrawn).is_none());
    let mut research = consent(json!({"type": "deny"}));
    research["scope"] = json!({"coding": [{"system": PRIVACY, "code": "research"}]});
    assert!(Directive::compile("r", 1, &research).is_none());
    // A root without a type takes it from the opt-in / opt-out rule.
    let mut opt_out = consent(json!({"period": {"start": "2000-01-01"}}));
    opt_out["policyRule"]["coding"][0]["code"] = json!("OPTOUT");
    let directives = [directive("o", &opt_out)];
    assert_eq!(
        ask(&directives, read_by(&[], observation())).verdict,
        Verdict::Deny
    );
}

#[test]
fn an_unreadable_active_consent_denies_everything() {
    let broken = consent(json!({"type": "sometimes", "actor": [actor("Practitioner/a")]}));
    let directives = [directive("broken", &broken)];
    let decision = ask(&directives, read_by(&["Practitioner/b"], observation()));
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(
        decision.decided_by.as_deref(),
        Some("Consent/broken/_history/1")
    );
}

#[test]
fn validation_names_what_is_wrong() {
    assert!(validate(&consent(
        json!({"type": "deny", "actor": [actor("Practitioner/a")]})
    ))
    .is_empty());
    let cases = [
        (json!({"type": "maybe"}), "permit or deny"),
        (
            json!({"type": "deny", "period": {"start": "2022-01-01", "end": "2021-01-01"}}),
            "start is after end",
        ),
        (
            json!({"type": "deny", "actor": [{"reference": {"reference": "Practitioner/a"}}]}),
            "role is required",
        ),
        (
            json!({"type": "deny", "actor": [actor("Observation/x")]}),
            "literal reference to one of",
        ),
        (
            json!({"type": "deny", "data": [{"meaning": "sometimes", "reference": {"reference": "Observation/x"}}]}),
            "meaning must be",
        ),
    ];
    for (provision, expected) in cases {
        let problems = validate(&consent(provision.clone()));
        assert!(
            problems.iter().any(|problem| problem.contains(expected)),
            "{provision}: {problems:?}"
        );
    }
    let mut no_patient = consent(json!({"type": "deny"}));
    no_patient["patient"] = json!({"reference": "Group/g"});
    assert!(validate(&no_patient).iter().any(|p| p.contains("ppc-2")));
    let mut opt_out_only = consent(json!({}));
    opt_out_only.as_object_mut().unwrap().remove("provision");
    opt_out_only["policyRule"]["coding"][0]["code"] = json!("OPTOUT");
    assert!(
        validate(&opt_out_only).is_empty(),
        "a bare opt-out is a whole directive"
    );
    let directives = [directive("out", &opt_out_only)];
    assert_eq!(
        ask(&directives, read_by(&[], observation())).verdict,
        Verdict::Deny
    );
    let mut no_provision = opt_out_only.clone();
    no_provision["policyRule"]["coding"][0]["code"] = json!("HIPAA-Auth");
    assert!(validate(&no_provision)
        .iter()
        .any(|p| p.contains("provision is required")));
    let mut no_rule = consent(json!({"actor": [actor("Practitioner/a")]}));
    no_rule.as_object_mut().unwrap().remove("policyRule");
    let problems = validate(&no_rule);
    assert!(problems.iter().any(|p| p.contains("ppc-1")), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("root provision")),
        "{problems:?}"
    );
    // Nesting is bounded.
    let mut deep = json!({"type": "deny"});
    for _ in 0..10 {
        deep = json!({"type": "deny", "provision": [deep]});
    }
    assert!(validate(&consent(deep))
        .iter()
        .any(|p| p.contains("nest at most")));
}

#[test]
fn partial_dates_cover_their_whole_span() {
    let start = parse_time("2020", Bound::Start).unwrap();
    let end = parse_time("2020", Bound::End).unwrap();
    assert_eq!(start.to_rfc3339(), "2020-01-01T00:00:00+00:00");
    assert_eq!(end.to_rfc3339(), "2020-12-31T23:59:59.999999+00:00");
    assert_eq!(
        parse_time("2021-02", Bound::End).unwrap().to_rfc3339(),
        "2021-02-28T23:59:59.999999+00:00"
    );
    assert!(parse_time("2021-13", Bound::Start).is_none());
}
