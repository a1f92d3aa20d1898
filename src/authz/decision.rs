//! The one decision point: effective permission = SMART scopes ∩ Casbin policy ∩ patient
//! consent (with break-the-glass).
//!
//! Two steps, so that each interaction costs a fixed number of policy evaluations and never one
//! per stored row:
//! 1. [`Decider::decide`], per request and resource type: can this caller's scopes and roles
//!    ever allow this interaction on this type? No → 403. Yes → a [`Permit`], the only way to
//!    obtain the store [`Scope`] that every storage call needs (authorization as a capability).
//! 2. [`Decider::visible`], per resource: does this particular resource fall within the permit
//!    (compartment, care team, security labels, granular scope constraints, policy attributes,
//!    and then the patient's Consents, see [`crate::consent`])? No → it answers like a missing
//!    resource (404), or is left out of a Bundle.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::policy::{PolicyAttributes, PolicyEngine};
use super::principal::Principal;
use super::scopes::{Permission, ScopeContext, ScopeGrant};
use crate::consent::enforce::{ConsentSource, RequestConsents};
use crate::consent::{self, AccessRequest, ConsentAction, Verdict};
use crate::crypto::vault::Vault;
use crate::error::{ApiError, ApiResult};
use crate::store::{Scope, Store};

/// FHIR interactions as the decision sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Read,
    VRead,
    HistoryInstance,
    HistoryType,
    HistorySystem,
    Search,
    Create,
    Update,
    Delete,
    /// `Patient/$erase`: destroys a whole patient compartment (needs a `.d` scope on Patient and
    /// a policy line naming `erase`).
    Erase,
}

impl Interaction {
    /// The SMART permission letter the interaction needs.
    pub fn permission(self) -> Permission {
        match self {
            Interaction::Read | Interaction::VRead | Interaction::HistoryInstance => {
                Permission::Read
            }
            Interaction::HistoryType | Interaction::HistorySystem | Interaction::Search => {
                Permission::Search
            }
            Interaction::Create => Permission::Create,
            Interaction::Update => Permission::Update,
            Interaction::Delete | Interaction::Erase => Permission::Delete,
        }
    }

    /// The action name the policy uses.
    pub fn action(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::VRead => "vread",
            Interaction::HistoryInstance
            | Interaction::HistoryType
            | Interaction::HistorySystem => "history",
            Interaction::Search => "search",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
            Interaction::Erase => "erase",
        }
    }
}

/// Permission to perform one interaction on one resource type, subject to per-resource checks.
/// Only [`Decider::decide`] makes one (copies of it carry the same decision).
#[derive(Clone)]
pub struct Permit {
    principal: Arc<Principal>,
    interaction: Interaction,
    resource_type: Option<String>,
    scope: Scope,
    /// Granted only through `patient/` scopes: confined to the launch patient's compartment
    /// (resources outside every compartment stay reachable, as SMART intends).
    patient_confined: bool,
    /// Granular scope constraints (any one set must hold); `None` = unconstrained.
    constraints: Option<Vec<Vec<(String, String)>>>,
    /// The caller's own compartment pseudonym, when the caller is (or launched as) a patient.
    own_compartment: Option<String>,
    /// The patients' directives read for this request (a permit lives one request).
    consents: Arc<RequestConsents>,
}

impl Permit {
    /// The store scope this permit opens.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The caller.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The caller, shared (to decide a further interaction in the same request).
    pub fn principal_arc(&self) -> &Arc<Principal> {
        &self.principal
    }

    /// The resource type permitted (`None` for the system level).
    pub fn resource_type(&self) -> Option<&str> {
        self.resource_type.as_deref()
    }

    /// The interaction permitted.
    pub fn interaction(&self) -> Interaction {
        self.interaction
    }

    /// Whether the per-resource check reads the resource's content (granular scope constraints,
    /// a practitioner's care team). Security labels are looked for by the caller.
    pub fn needs_content(&self) -> bool {
        self.constraints.is_some() || self.principal.practitioner_id().is_some()
    }

    /// The compartment a query can be narrowed to up front: a patient-confined permit never
    /// sees other compartments, so history and search need not read them.
    pub fn compartment_filter(&self) -> Option<&str> {
        self.patient_confined
            .then_some(self.own_compartment.as_deref())
            .flatten()
    }
}

/// What the visibility check knows about one stored resource.
pub struct ResourceFacts<'a> {
    pub resource_type: &'a str,
    /// The logical id (`None` for a resource not yet created).
    pub id: Option<&'a str>,
    /// The compartment pseudonym of the row.
    pub compartment: Option<&'a str>,
    /// The resource JSON; `None` for a deletion.
    pub resource: Option<&'a Value>,
}

/// Makes permits and checks resources against them.
pub struct Decider {
    policy: Arc<PolicyEngine>,
    store: Arc<dyn Store>,
    vault: Arc<Vault>,
    tenant: String,
    care_teams: moka::sync::Cache<(String, String), bool>,
    consents: ConsentSource,
    /// The decision when no Consent of the patient speaks to an access.
    consent_default: Verdict,
}

impl Decider {
    /// A decider over the policy, and the store and vault (for compartments and care teams).
    pub fn new(
        policy: Arc<PolicyEngine>,
        store: Arc<dyn Store>,
        vault: Arc<Vault>,
        tenant: String,
        consent_default: Verdict,
    ) -> Self {
        Decider {
            policy,
            consents: ConsentSource::new(store.clone(), vault.clone()),
            consent_default,
            store,
            vault,
            tenant,
            // Care-team membership changes rarely; 30 s keeps one lookup off most requests.
            care_teams: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
        }
    }

    /// The policy engine (reload on SIGHUP).
    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// A store scope for the server's own work that no caller drives (CLI commands, the
    /// care-team lookup below). Grep for it: every use is a deliberate bypass of the decision.
    pub fn system_scope(&self) -> Scope {
        Scope::system(&self.tenant)
    }

    /// Decides whether `principal` may ever perform `interaction` on `resource_type` (`None`:
    /// every type, system history).
    ///
    /// # Errors
    /// 403 when the scopes or the roles never allow it.
    pub async fn decide(
        &self,
        principal: &Arc<Principal>,
        interaction: Interaction,
        resource_type: Option<&str>,
    ) -> ApiResult<Permit> {
        let permission = interaction.permission();
        let type_for_scopes = resource_type.unwrap_or("*");
        let broad = principal.scopes.grant(
            &[ScopeContext::User, ScopeContext::System],
            type_for_scopes,
            permission,
        );
        let patient_grant = if principal.patient.is_some() {
            principal
                .scopes
                .grant(&[ScopeContext::Patient], type_for_scopes, permission)
        } else {
            // `patient/` scopes mean nothing without a launch patient to confine them to.
            ScopeGrant::Denied
        };
        let (patient_confined, constraints) = match (&broad, &patient_grant) {
            (ScopeGrant::Unconstrained, _) => (false, None),
            (ScopeGrant::Constrained(sets), _) => (false, Some(sets.clone())),
            (ScopeGrant::Denied, ScopeGrant::Unconstrained) => (true, None),
            (ScopeGrant::Denied, ScopeGrant::Constrained(sets)) => (true, Some(sets.clone())),
            (ScopeGrant::Denied, ScopeGrant::Denied) => {
                return Err(ApiError::Forbidden(format!(
                    "the token's scopes do not allow {} here",
                    interaction.action()
                )))
            }
        };
        let policy_type = resource_type.unwrap_or("*");
        let ever_allowed = [true, false].iter().any(|&in_compartment| {
            let attributes = PolicyAttributes {
                in_own_compartment: in_compartment,
                care_team: in_compartment,
                outside_compartments: !in_compartment,
                restricted: false,
                purpose: principal.purpose_of_use.clone().unwrap_or_default(),
                same_tenant: true,
            };
            self.policy.enforce(
                &principal.roles,
                policy_type,
                interaction.action(),
                &attributes,
            )
        });
        if !ever_allowed {
            return Err(ApiError::Forbidden(format!(
                "the caller's roles do not allow {} here",
                interaction.action()
            )));
        }
        let scope = Scope::system(&self.tenant);
        let own_compartment = match principal.own_patient() {
            Some(patient) => Some(self.store.compartment_pseudonym(&scope, patient).await?),
            None => None,
        };
        Ok(Permit {
            principal: principal.clone(),
            interaction,
            resource_type: resource_type.map(str::to_string),
            scope,
            patient_confined,
            constraints,
            own_compartment,
            consents: Arc::default(),
        })
    }

    /// Whether one resource falls within the permit.
    ///
    /// # Errors
    /// 503/500 when the care-team lookup cannot read the store.
    pub async fn visible(&self, permit: &Permit, facts: &ResourceFacts<'_>) -> ApiResult<bool> {
        if !self.writable(permit, facts).await? {
            return Ok(false);
        }
        let in_own_compartment =
            facts.compartment.is_some() && facts.compartment == permit.own_compartment.as_deref();
        self.consent_allows(permit, facts, in_own_compartment).await
    }

    /// Whether new content falls within the permit: everything [`Decider::visible`] checks but
    /// the patient's Consents, which govern access to what is stored, not the recording of care
    /// (the caller knows what they send).
    ///
    /// # Errors
    /// 503/500 when the care-team lookup cannot read the store.
    pub async fn writable(&self, permit: &Permit, facts: &ResourceFacts<'_>) -> ApiResult<bool> {
        if permit
            .resource_type
            .as_deref()
            .is_some_and(|resource_type| resource_type != facts.resource_type)
        {
            return Ok(false);
        }
        let in_own_compartment =
            facts.compartment.is_some() && facts.compartment == permit.own_compartment.as_deref();
        if permit.patient_confined && facts.compartment.is_some() && !in_own_compartment {
            return Ok(false);
        }
        if let (Some(sets), Some(resource)) = (&permit.constraints, facts.resource) {
            if !sets.iter().any(|set| matches_constraints(resource, set)) {
                return Ok(false);
            }
        }
        let care_team = match (facts.compartment, permit.principal.practitioner_id()) {
            (Some(compartment), Some(practitioner)) => {
                // A Patient being written that names the practitioner counts, so that a
                // practitioner can register their own patient.
                let names_caller = facts.resource_type == "Patient"
                    && facts.resource.is_some_and(|patient| {
                        references(
                            &patient["generalPractitioner"],
                            &format!("Practitioner/{practitioner}"),
                        )
                    });
                names_caller || self.on_care_team(compartment, practitioner).await?
            }
            _ => false,
        };
        let attributes = PolicyAttributes {
            in_own_compartment,
            care_team,
            outside_compartments: facts.compartment.is_none(),
            restricted: facts.resource.is_some_and(is_restricted),
            purpose: permit.principal.purpose_of_use.clone().unwrap_or_default(),
            same_tenant: true,
        };
        Ok(self.policy.enforce(
            &permit.principal.roles,
            facts.resource_type,
            permit.interaction.action(),
            &attributes,
        ))
    }

    /// Whether judging a resource of `compartment` under the patient's Consents needs its
    /// content (the caller then parses the body).
    ///
    /// # Errors
    /// 503 when the patient's Consents cannot be read.
    pub async fn needs_content(
        &self,
        permit: &Permit,
        resource_type: &str,
        compartment: Option<&str>,
    ) -> ApiResult<bool> {
        if permit.needs_content() {
            return Ok(true);
        }
        match compartment {
            Some(compartment) if consent_applies(permit, resource_type, compartment) => Ok(self
                .consents
                .directives(&permit.consents, &permit.scope, compartment)
                .await?
                .iter()
                .any(consent::Directive::reads_content)),
            _ => Ok(false),
        }
    }

    /// Reads the Consents of these compartments at once (a page of search results).
    ///
    /// # Errors
    /// 503 when the patient's Consents cannot be read.
    pub async fn prefetch_consents(
        &self,
        permit: &Permit,
        compartments: &[String],
    ) -> ApiResult<()> {
        self.consents
            .prefetch(&permit.consents, &permit.scope, compartments)
            .await
    }

    /// The patient's Consents on an access the policy allows; an emergency declaration
    /// overrides a deny (and the override is recorded).
    async fn consent_allows(
        &self,
        permit: &Permit,
        facts: &ResourceFacts<'_>,
        in_own_compartment: bool,
    ) -> ApiResult<bool> {
        let Some(compartment) = facts.compartment else {
            return Ok(true);
        };
        if in_own_compartment || !consent_applies(permit, facts.resource_type, compartment) {
            return Ok(true);
        }
        let action = match permit.interaction {
            Interaction::Create | Interaction::Update | Interaction::Delete => {
                ConsentAction::Correct
            }
            _ => ConsentAction::Access,
        };
        let directives = self
            .consents
            .directives(&permit.consents, &permit.scope, compartment)
            .await?;
        if directives.is_empty() && self.consent_default == Verdict::Permit {
            return Ok(true);
        }
        let caller = self
            .consents
            .caller_references(
                &permit.consents,
                &permit.scope,
                &permit.principal,
                &directives,
            )
            .await?;
        let request = AccessRequest {
            action,
            purpose: permit.principal.purpose_of_use.as_deref(),
            caller: &caller,
            resource_type: facts.resource_type,
            resource_id: facts.id,
            resource: facts.resource,
            now: chrono::Utc::now(),
        };
        let decision = consent::decide(&directives, &request, self.consent_default);
        let overridden = decision.verdict == Verdict::Deny
            && permit
                .principal
                .emergency
                .as_ref()
                .is_some_and(|emergency| {
                    chrono::Utc::now().timestamp_micros() <= emergency.expires_us
                });
        crate::api::audit::note_consent(
            decision.decided_by.as_deref(),
            decision.verdict,
            overridden,
        );
        Ok(decision.verdict == Verdict::Permit || overridden)
    }

    /// Whether the practitioner is on the care team of the patient behind `compartment`: the
    /// Patient's `generalPractitioner` names them, or an active CareTeam of the patient lists
    /// them as a participant.
    async fn on_care_team(&self, compartment: &str, practitioner: &str) -> ApiResult<bool> {
        let key = (compartment.to_string(), practitioner.to_string());
        if let Some(known) = self.care_teams.get(&key) {
            return Ok(known);
        }
        let reference = format!("Practitioner/{practitioner}");
        let scope = self.system_scope();
        let mut member = false;
        for record in self
            .store
            .current_in_compartment(&scope, compartment)
            .await?
        {
            let relevant = matches!(record.resource_type.as_str(), "Patient" | "CareTeam");
            if !relevant || record.deleted {
                continue;
            }
            let Some(body) = self.vault.open(&scope, &record).await? else {
                continue;
            };
            let resource: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            member |= match record.resource_type.as_str() {
                "Patient" => references(&resource["generalPractitioner"], &reference),
                _ => {
                    resource["status"] == "active"
                        && resource["participant"]
                            .as_array()
                            .is_some_and(|participants| {
                                participants.iter().any(|participant| {
                                    references(&participant["member"], &reference)
                                        && period_includes_now(&participant["period"])
                                })
                            })
                }
            };
        }
        self.care_teams.insert(key, member);
        Ok(member)
    }
}

/// Whether the patient's Consents govern this access at all. They govern everyone but the
/// patient themselves, except for the Consents (everyone who may read a Consent must be able
/// to learn what the patient decided) and the server's own operator work (`custodian import`
/// reading back what it loads is not a disclosure).
fn consent_applies(permit: &Permit, resource_type: &str, compartment: &str) -> bool {
    let own = permit.own_compartment.as_deref() == Some(compartment);
    !own && resource_type != "Consent" && permit.principal.issuer != crate::import::OPERATOR_ISSUER
}

/// Whether a reference element (or list of them) points at `target` (`Practitioner/123`,
/// relative or absolute).
fn references(element: &Value, target: &str) -> bool {
    match element {
        Value::Array(items) => items.iter().any(|item| references(item, target)),
        Value::Object(map) => {
            map.get("reference")
                .and_then(Value::as_str)
                .is_some_and(|reference| {
                    reference == target || reference.ends_with(&format!("/{target}"))
                })
        }
        _ => false,
    }
}

/// Whether a FHIR Period (absent = open) includes the present moment. Bounds that cannot be read
/// count as not including it (fail closed).
pub(crate) fn period_includes_now(period: &Value) -> bool {
    let now = chrono::Utc::now();
    let bound = |name: &str| -> Option<Option<chrono::DateTime<chrono::Utc>>> {
        match period.get(name).and_then(Value::as_str) {
            None => Some(None),
            Some(text) => parse_fhir_time(text).map(Some),
        }
    };
    match (bound("start"), bound("end")) {
        (Some(start), Some(end)) => {
            start.is_none_or(|start| start <= now) && end.is_none_or(|end| now <= end)
        }
        _ => false,
    }
}

/// A FHIR dateTime at the precision given (a date means its start; a year its first day).
fn parse_fhir_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&chrono::Utc));
    }
    let padded = match text.len() {
        4 => format!("{text}-01-01"),
        7 => format!("{text}-01"),
        _ => text.to_string(),
    };
    chrono::NaiveDate::parse_from_str(&padded, "%Y-%m-%d")
        .ok()?
        .and_hms_opt(0, 0, 0)
        .map(|time| time.and_utc())
}

/// Confidentiality R/V or a sensitive-category label in `meta.security`.
fn is_restricted(resource: &Value) -> bool {
    const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
    const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    const SENSITIVE: &[&str] = &["ETH", "HIV", "PSY", "SDV", "SEX", "STD", "SUD", "BH"];
    resource["meta"]["security"]
        .as_array()
        .is_some_and(|labels| {
            labels.iter().any(|label| {
                let code = label["code"].as_str().unwrap_or_default();
                match label["system"].as_str() {
                    Some(CONFIDENTIALITY) => code == "R" || code == "V",
                    Some(ACT_CODE) => SENSITIVE.contains(&code),
                    _ => false,
                }
            })
        })
}

/// Granular scope constraints (`category=laboratory`, `code=http://loinc.org|1234-5`) checked
/// on the element of that name: codes, Codings and CodeableConcepts match on `system|code` or
/// `code`; strings match exactly. An element this check does not understand does not match
/// (fail closed). The search issue replaces this with the search-parameter evaluator.
fn matches_constraints(resource: &Value, constraints: &[(String, String)]) -> bool {
    constraints.iter().all(|(name, expected)| {
        let (system, code) = match expected.split_once('|') {
            Some((system, code)) => (Some(system), code),
            None => (None, expected.as_str()),
        };
        token_matches(&resource[name], system, code)
    })
}

fn token_matches(element: &Value, system: Option<&str>, code: &str) -> bool {
    match element {
        Value::Array(items) => items.iter().any(|item| token_matches(item, system, code)),
        Value::String(text) => system.is_none() && text == code,
        Value::Object(map) => {
            if let Some(codings) = map.get("coding") {
                return token_matches(codings, system, code);
            }
            let code_ok = map.get("code").and_then(Value::as_str) == Some(code);
            let system_ok = system
                .is_none_or(|system| map.get("system").and_then(Value::as_str) == Some(system));
            code_ok && system_ok
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn granular_constraints_match_codeable_concepts_and_codes() {
        let observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
        });
        let lab = |value: &str| vec![("category".to_string(), value.to_string())];
        assert!(matches_constraints(&observation, &lab("laboratory")));
        assert!(matches_constraints(
            &observation,
            &lab("http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
        ));
        assert!(!matches_constraints(&observation, &lab("vital-signs")));
        assert!(!matches_constraints(
            &observation,
            &lab("other-system|laboratory")
        ));
        assert!(matches_constraints(
            &observation,
            &[("status".into(), "final".into())]
        ));
        assert!(!matches_constraints(
            &observation,
            &[("unknown".into(), "x".into())]
        ));
    }

    #[test]
    fn restricted_labels_are_recognised() {
        let restricted = json!({"meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}});
        let normal = json!({"meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]}});
        let hiv = json!({"meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]}});
        assert!(is_restricted(&restricted));
        assert!(!is_restricted(&normal));
        assert!(is_restricted(&hiv));
        assert!(!is_restricted(&json!({})));
    }

    #[test]
    fn care_team_periods_bound_membership() {
        assert!(period_includes_now(&json!(null)));
        assert!(period_includes_now(&json!({"start": "2000-01-01"})));
        assert!(!period_includes_now(&json!({"end": "2001"})));
        assert!(!period_includes_now(
            &json!({"start": "2999-01-01T00:00:00Z"})
        ));
        assert!(!period_includes_now(&json!({"start": "not a date"})));
    }

    #[test]
    fn references_match_relative_and_absolute() {
        let list = json!([{"reference": "Practitioner/a"}, {"reference": "https://x/fhir/Practitioner/b"}]);
        assert!(references(&list, "Practitioner/a"));
        assert!(references(&list, "Practitioner/b"));
        assert!(!references(&list, "Practitioner/c"));
    }
}
