//! Patient consent (R4 `Consent`, scope `patient-privacy`): what a patient's privacy directives
//! allow, compiled once per stored version and evaluated per resource without further I/O.
//!
//! - [`Directive::compile`] turns a stored Consent into a provision tree; [`validate`] is the
//!   stricter check a Consent must pass to be written (422 otherwise).
//! - [`decide`] answers one access: which directive (if any) decides it, and how.
//! - [`break_glass`]: the emergency override of a consent deny, its time box and its review.
//!
//! The rules (README, "Consent", says the same in prose):
//! - Only `active` Consents with scope `patient-privacy` count; `inactive`, `rejected`,
//!   `entered-in-error`, `draft` and `proposed` ones, and deleted ones, do not (withdrawal is an
//!   update to `inactive` or a delete).
//! - A provision applies when every criterion it states holds (each criterion is a list of
//!   alternatives: one must match). A provision's nested provisions are exceptions to it: when
//!   one of them applies, it decides instead (deny wins among siblings that both apply).
//! - Across Consents, the newest (`dateTime`, else `meta.lastUpdated`) whose tree applies
//!   decides; when none applies, the configured default does (opt-out: permit, opt-in: deny).
//! - Fails closed: a criterion that cannot be judged (a resource without a clinical date
//!   against `dataPeriod`, a body not at hand) makes a deny provision apply and a permit
//!   provision not apply.

pub mod break_glass;
pub mod enforce;

use std::collections::HashSet;

use chrono::{DateTime, Datelike as _, Utc};
use serde_json::Value;

/// How a provision, or a whole decision, comes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Permit,
    Deny,
}

impl Verdict {
    fn opposite(self) -> Verdict {
        match self {
            Verdict::Permit => Verdict::Deny,
            Verdict::Deny => Verdict::Permit,
        }
    }

    /// `permit` or `deny`, as FHIR codes them.
    pub fn code(self) -> &'static str {
        match self {
            Verdict::Permit => "permit",
            Verdict::Deny => "deny",
        }
    }
}

/// What the caller does with the data, as the consent-action code system names it
/// (http://terminology.hl7.org/CodeSystem/consentaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentAction {
    /// Reading, searching, history, export: matches provisions on `access`, `use` or
    /// `disclose`.
    Access,
    /// Writing over data already held (update, patch, delete): `correct`.
    Correct,
}

impl ConsentAction {
    fn matches(self, code: &str) -> bool {
        match self {
            ConsentAction::Access => matches!(code, "access" | "use" | "disclose"),
            ConsentAction::Correct => code == "correct",
        }
    }
}

/// One access to judge.
pub struct AccessRequest<'a> {
    pub action: ConsentAction,
    /// The purpose of use the request is made under (`TREAT`, `ETREAT`…).
    pub purpose: Option<&'a str>,
    /// The references (`Practitioner/123`, `Organization/9`, `CareTeam/4`…) that designate the
    /// caller, among those the directives name.
    pub caller: &'a HashSet<String>,
    pub resource_type: &'a str,
    pub resource_id: Option<&'a str>,
    /// The resource content; `None` when it is not at hand (a deletion).
    pub resource: Option<&'a Value>,
    pub now: DateTime<Utc>,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// `Consent/{id}/_history/{version}` of the deciding directive; `None` when the default
    /// decided.
    pub decided_by: Option<String>,
}

/// A half-open time range; a missing bound is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Period {
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
}

impl Period {
    fn contains(&self, instant: DateTime<Utc>) -> bool {
        self.start.is_none_or(|start| start <= instant) && self.end.is_none_or(|end| instant <= end)
    }

    fn overlaps(&self, other: &Period) -> bool {
        let starts_before_other_ends = match (self.start, other.end) {
            (Some(start), Some(end)) => start <= end,
            _ => true,
        };
        let ends_after_other_starts = match (self.end, other.start) {
            (Some(end), Some(start)) => end >= start,
            _ => true,
        };
        starts_before_other_ends && ends_after_other_starts
    }
}

/// A `system|code` pair; a missing system matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Code {
    system: Option<String>,
    code: String,
}

impl Code {
    fn matches(&self, system: Option<&str>, code: &str) -> bool {
        self.code == code
            && self
                .system
                .as_deref()
                .is_none_or(|wanted| system == Some(wanted))
    }
}

/// One `provision.data` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DataReference {
    /// `instance`, `related`, `dependents` or `authoredby`.
    meaning: String,
    /// `Type/id`.
    target: String,
}

/// One (possibly nested) provision, compiled.
#[derive(Debug, Clone, PartialEq)]
struct Provision {
    verdict: Verdict,
    period: Option<Period>,
    actors: Vec<String>,
    actions: Vec<String>,
    security_labels: Vec<Code>,
    purposes: Vec<String>,
    classes: Vec<String>,
    codes: Vec<Code>,
    data_period: Option<Period>,
    data: Vec<DataReference>,
    exceptions: Vec<Provision>,
}

/// Whether a criterion holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    Yes,
    No,
    /// Cannot be judged from what is at hand.
    Unknown,
}

impl Holds {
    fn from(value: bool) -> Holds {
        if value {
            Holds::Yes
        } else {
            Holds::No
        }
    }

    fn and(self, other: Holds) -> Holds {
        match (self, other) {
            (Holds::No, _) | (_, Holds::No) => Holds::No,
            (Holds::Unknown, _) | (_, Holds::Unknown) => Holds::Unknown,
            _ => Holds::Yes,
        }
    }
}

impl Provision {
    /// A provision that denies every access.
    fn deny_all() -> Provision {
        Provision {
            verdict: Verdict::Deny,
            period: None,
            actors: Vec::new(),
            actions: Vec::new(),
            security_labels: Vec::new(),
            purposes: Vec::new(),
            classes: Vec::new(),
            codes: Vec::new(),
            data_period: None,
            data: Vec::new(),
            exceptions: Vec::new(),
        }
    }

    /// The provision's verdict if it applies, an exception's if one applies in turn.
    fn evaluate(&self, request: &AccessRequest<'_>) -> Option<Verdict> {
        let holds = self.criteria(request);
        let applies = match holds {
            Holds::Yes => true,
            Holds::No => false,
            // Fail closed: an undecidable deny applies, an undecidable permit does not.
            Holds::Unknown => self.verdict == Verdict::Deny,
        };
        if !applies {
            return None;
        }
        let mut exception = None;
        for nested in &self.exceptions {
            match nested.evaluate(request) {
                Some(Verdict::Deny) => return Some(Verdict::Deny),
                Some(Verdict::Permit) => exception = Some(Verdict::Permit),
                None => {}
            }
        }
        Some(exception.unwrap_or(self.verdict))
    }

    fn criteria(&self, request: &AccessRequest<'_>) -> Holds {
        let mut holds = Holds::Yes;
        if let Some(period) = &self.period {
            holds = holds.and(Holds::from(period.contains(request.now)));
        }
        if !self.actors.is_empty() {
            holds = holds.and(Holds::from(
                self.actors
                    .iter()
                    .any(|actor| request.caller.contains(actor)),
            ));
        }
        if !self.actions.is_empty() {
            holds = holds.and(Holds::from(
                self.actions.iter().any(|code| request.action.matches(code)),
            ));
        }
        if !self.purposes.is_empty() {
            holds =
                holds.and(Holds::from(request.purpose.is_some_and(|purpose| {
                    self.purposes.iter().any(|code| code == purpose)
                })));
        }
        if !self.classes.is_empty() {
            holds = holds.and(Holds::from(
                self.classes
                    .iter()
                    .any(|class| class == request.resource_type),
            ));
        }
        if holds == Holds::No {
            return Holds::No;
        }
        // The rest reads the resource's content.
        let needs_content = !self.security_labels.is_empty()
            || !self.codes.is_empty()
            || self.data_period.is_some()
            || self.data.iter().any(|data| data.meaning != "instance");
        let resource = match request.resource {
            Some(resource) => resource,
            None if needs_content => return holds.and(Holds::Unknown),
            None => &Value::Null,
        };
        if !self.security_labels.is_empty() {
            holds = holds.and(Holds::from(codings(&resource["meta"]["security"]).any(
                |(system, code)| {
                    self.security_labels
                        .iter()
                        .any(|label| label.matches(system, code))
                },
            )));
        }
        if !self.codes.is_empty() {
            let found: Vec<(Option<&str>, &str)> = clinical_codes(resource).collect();
            holds = holds.and(if found.is_empty() {
                Holds::Unknown
            } else {
                Holds::from(found.iter().any(|(system, code)| {
                    self.codes
                        .iter()
                        .any(|wanted| wanted.matches(*system, code))
                }))
            });
        }
        if let Some(data_period) = &self.data_period {
            holds = holds.and(match clinical_period(resource) {
                Some(period) => Holds::from(data_period.overlaps(&period)),
                None => Holds::Unknown,
            });
        }
        if !self.data.is_empty() {
            let own = request
                .resource_id
                .map(|id| format!("{}/{id}", request.resource_type));
            holds = holds.and(Holds::from(self.data.iter().any(|data| {
                own.as_deref() == Some(data.target.as_str())
                    || (data.meaning != "instance" && mentions(resource, &data.target))
            })));
        }
        holds
    }

    fn actor_references<'a>(&'a self, into: &mut Vec<&'a str>) {
        into.extend(self.actors.iter().map(String::as_str));
        for nested in &self.exceptions {
            nested.actor_references(into);
        }
    }

    fn reads_content(&self) -> bool {
        !self.security_labels.is_empty()
            || !self.codes.is_empty()
            || self.data_period.is_some()
            || self.data.iter().any(|data| data.meaning != "instance")
            || self.exceptions.iter().any(Provision::reads_content)
    }
}

/// One active patient-privacy Consent, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    /// `Consent/{id}/_history/{version}`.
    pub reference: String,
    /// When the patient expressed it (`dateTime`, else `meta.lastUpdated`): newest wins.
    pub recorded: DateTime<Utc>,
    root: Provision,
}

impl Directive {
    /// The directive a stored Consent expresses; `None` when it does not take part in access
    /// decisions (not active, another scope).
    pub fn compile(id: &str, version: i64, consent: &Value) -> Option<Directive> {
        if consent["status"] != "active" || !is_patient_privacy(consent) {
            return None;
        }
        // Fail closed: an active directive this server cannot read (stored before validation
        // existed, or altered in the database) denies everything rather than nothing.
        let root = root_verdict(consent)
            .and_then(|verdict| compile_provision(&consent["provision"], verdict))
            .unwrap_or_else(|_| Provision::deny_all());
        let recorded = consent["dateTime"]
            .as_str()
            .or(consent["meta"]["lastUpdated"].as_str())
            .and_then(|text| parse_time(text, Bound::Start))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        Some(Directive {
            reference: format!("Consent/{id}/_history/{version}"),
            recorded,
            root,
        })
    }

    /// The actor references this directive names (to find which designate the caller).
    pub fn actor_references(&self) -> Vec<&str> {
        let mut references = Vec::new();
        self.root.actor_references(&mut references);
        references
    }

    /// Whether judging an access needs the resource's content.
    pub fn reads_content(&self) -> bool {
        self.root.reads_content()
    }
}

/// Decides one access under a patient's directives: the newest directive that applies, else
/// the default.
pub fn decide(directives: &[Directive], request: &AccessRequest<'_>, default: Verdict) -> Decision {
    let mut ordered: Vec<&Directive> = directives.iter().collect();
    ordered.sort_by(|a, b| {
        b.recorded
            .cmp(&a.recorded)
            .then_with(|| b.reference.cmp(&a.reference))
    });
    for directive in ordered {
        if let Some(verdict) = directive.root.evaluate(request) {
            return Decision {
                verdict,
                decided_by: Some(directive.reference.clone()),
            };
        }
    }
    Decision {
        verdict: default,
        decided_by: None,
    }
}

/// The problems that make a Consent unacceptable for writing (each one a sentence for the
/// OperationOutcome; no values quoted). Beyond what the R4 structure checks catch: the parts
/// that decide access must be present and coherent, so that a directive never silently means
/// something else than its author intended.
pub fn validate(consent: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if consent["status"].as_str().is_none() {
        problems.push("Consent.status is required".to_string());
    }
    if !consent["scope"].is_object() {
        problems.push("Consent.scope is required".to_string());
    }
    if consent["category"].as_array().is_none_or(Vec::is_empty) {
        problems.push("Consent.category needs at least one entry".to_string());
    }
    // ppc-1: either a policy or a policyRule.
    if consent["policy"].as_array().is_none_or(Vec::is_empty) && !consent["policyRule"].is_object()
    {
        problems.push("Consent needs a policy or a policyRule (invariant ppc-1)".to_string());
    }
    if !is_patient_privacy(consent) {
        return problems;
    }
    // ppc-2: a privacy consent names its patient.
    let patient = consent["patient"]["reference"].as_str().unwrap_or_default();
    if !patient.starts_with("Patient/") && !patient.contains("/Patient/") {
        problems.push(
            "Consent.patient must reference the Patient for a patient-privacy consent (ppc-2)"
                .to_string(),
        );
    }
    if !consent["provision"].is_object() {
        // Without provisions an opt-in or opt-out policyRule is the whole directive.
        if root_verdict(consent).is_err() {
            problems.push(
                "Consent.provision is required for a patient-privacy consent unless policyRule is OPTIN or OPTOUT: it states what is permitted or denied"
                    .to_string(),
            );
        }
        return problems;
    }
    match root_verdict(consent) {
        Ok(verdict) => {
            if let Err(problem) = compile_provision(&consent["provision"], verdict) {
                problems.push(problem);
            }
        }
        Err(problem) => problems.push(problem),
    }
    problems
}

/// How deep provisions may nest: real directives use two or three levels.
const MAX_PROVISION_DEPTH: usize = 8;

/// The root provision's verdict: its `type`, or what an opt-in/opt-out `policyRule` implies.
fn root_verdict(consent: &Value) -> Result<Verdict, String> {
    if let Some(kind) = consent["provision"]["type"].as_str() {
        return verdict_of(kind, "Consent.provision.type");
    }
    let rule = codings(&consent["policyRule"]).map(|(_, code)| code);
    for code in rule {
        match code {
            "OPTIN" | "OPTINR" => return Ok(Verdict::Permit),
            "OPTOUT" | "OPTOUTE" => return Ok(Verdict::Deny),
            _ => {}
        }
    }
    Err("Consent.provision.type is required on the root provision unless policyRule is OPTIN or OPTOUT".to_string())
}

fn verdict_of(kind: &str, path: &str) -> Result<Verdict, String> {
    match kind {
        "permit" => Ok(Verdict::Permit),
        "deny" => Ok(Verdict::Deny),
        _ => Err(format!("{path} must be permit or deny")),
    }
}

fn compile_provision(value: &Value, verdict: Verdict) -> Result<Provision, String> {
    compile_at(value, verdict, "Consent.provision", 1)
}

fn compile_at(
    value: &Value,
    verdict: Verdict,
    path: &str,
    depth: usize,
) -> Result<Provision, String> {
    if depth > MAX_PROVISION_DEPTH {
        return Err(format!(
            "{path}: provisions nest at most {MAX_PROVISION_DEPTH} levels deep"
        ));
    }
    let period = match &value["period"] {
        Value::Null => None,
        period => Some(compile_period(period, &format!("{path}.period"))?),
    };
    let data_period = match &value["dataPeriod"] {
        Value::Null => None,
        period => Some(compile_period(period, &format!("{path}.dataPeriod"))?),
    };
    let mut actors = Vec::new();
    for (index, actor) in array(&value["actor"]).enumerate() {
        let at = format!("{path}.actor[{index}]");
        if !actor["role"].is_object() {
            return Err(format!("{at}.role is required"));
        }
        let reference = actor["reference"]["reference"].as_str().unwrap_or_default();
        let target = relative_reference(reference).filter(|target| {
            let resource_type = target.split('/').next().unwrap_or_default();
            ACTOR_TYPES.contains(&resource_type)
        });
        match target {
            Some(target) => actors.push(target),
            None => {
                return Err(format!(
                    "{at}.reference must be a literal reference to one of {}",
                    ACTOR_TYPES.join(", ")
                ))
            }
        }
    }
    let mut data = Vec::new();
    for (index, entry) in array(&value["data"]).enumerate() {
        let at = format!("{path}.data[{index}]");
        let meaning = entry["meaning"].as_str().unwrap_or_default();
        if !matches!(
            meaning,
            "instance" | "related" | "dependents" | "authoredby"
        ) {
            return Err(format!(
                "{at}.meaning must be instance, related, dependents or authoredby"
            ));
        }
        let target =
            relative_reference(entry["reference"]["reference"].as_str().unwrap_or_default())
                .ok_or_else(|| format!("{at}.reference must be a literal reference"))?;
        data.push(DataReference {
            meaning: meaning.to_string(),
            target,
        });
    }
    let mut exceptions = Vec::new();
    for (index, nested) in array(&value["provision"]).enumerate() {
        let at = format!("{path}.provision[{index}]");
        // A nested provision without a type is an exception: the opposite of its parent.
        let nested_verdict = match nested["type"].as_str() {
            Some(kind) => verdict_of(kind, &format!("{at}.type"))?,
            None => verdict.opposite(),
        };
        exceptions.push(compile_at(nested, nested_verdict, &at, depth + 1)?);
    }
    Ok(Provision {
        verdict,
        period,
        actors,
        actions: array(&value["action"])
            .flat_map(|action| codings(action).map(|(_, code)| code.to_string()))
            .collect(),
        security_labels: array(&value["securityLabel"])
            .filter_map(compile_code)
            .collect(),
        purposes: array(&value["purpose"])
            .filter_map(|purpose| purpose["code"].as_str().map(str::to_string))
            .collect(),
        classes: array(&value["class"])
            .filter_map(|class| class["code"].as_str().map(str::to_string))
            .collect(),
        codes: array(&value["code"])
            .flat_map(|concept| array(&concept["coding"]))
            .filter_map(compile_code)
            .collect(),
        data_period,
        data,
        exceptions,
    })
}

/// The resource types an actor may be (R4 `Consent.provision.actor.reference`).
const ACTOR_TYPES: &[&str] = &[
    "Device",
    "Group",
    "CareTeam",
    "Organization",
    "Patient",
    "Practitioner",
    "RelatedPerson",
    "PractitionerRole",
];

fn compile_period(value: &Value, path: &str) -> Result<Period, String> {
    let bound = |name: &str, which: Bound| -> Result<Option<DateTime<Utc>>, String> {
        match value[name].as_str() {
            None => Ok(None),
            Some(text) => parse_time(text, which)
                .map(Some)
                .ok_or_else(|| format!("{path}.{name} is not a dateTime")),
        }
    };
    let period = Period {
        start: bound("start", Bound::Start)?,
        end: bound("end", Bound::End)?,
    };
    if let (Some(start), Some(end)) = (period.start, period.end) {
        if start > end {
            return Err(format!("{path}: start is after end"));
        }
    }
    Ok(period)
}

fn compile_code(coding: &Value) -> Option<Code> {
    Some(Code {
        system: coding["system"].as_str().map(str::to_string),
        code: coding["code"].as_str()?.to_string(),
    })
}

fn is_patient_privacy(consent: &Value) -> bool {
    codings(&consent["scope"]).any(|(_, code)| code == "patient-privacy")
}

/// `Type/id` of a relative or absolute literal reference.
pub(crate) fn relative_reference(reference: &str) -> Option<String> {
    let mut segments = reference.trim_end_matches('/').rsplit('/');
    let id = segments.next()?;
    let resource_type = segments.next()?;
    (fhir_codec::is_resource_type(resource_type) && crate::fhir::is_valid_id(id))
        .then(|| format!("{resource_type}/{id}"))
}

/// The items of a JSON array (none for anything else).
fn array(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// `(system, code)` of a Coding, a CodeableConcept, or a list of either.
fn codings(value: &Value) -> Box<dyn Iterator<Item = (Option<&str>, &str)> + '_> {
    match value {
        Value::Array(items) => Box::new(items.iter().flat_map(codings)),
        Value::Object(map) => match map.get("coding") {
            Some(inner) => codings(inner),
            None => Box::new(
                map.get("code")
                    .and_then(Value::as_str)
                    .map(|code| (map.get("system").and_then(Value::as_str), code))
                    .into_iter(),
            ),
        },
        _ => Box::new(std::iter::empty()),
    }
}

/// The elements that carry a resource's clinical code, by the R4 resources' own names.
const CODE_ELEMENTS: &[&str] = &[
    "code",
    "medicationCodeableConcept",
    "vaccineCode",
    "type",
    "category",
];

fn clinical_codes(resource: &Value) -> impl Iterator<Item = (Option<&str>, &str)> {
    CODE_ELEMENTS
        .iter()
        .flat_map(move |name| codings(&resource[*name]))
}

/// The elements that carry when the data is about (for `dataPeriod`), first present wins.
const CLINICAL_DATE_ELEMENTS: &[&str] = &[
    "effectiveDateTime",
    "effectiveInstant",
    "effectivePeriod",
    "onsetDateTime",
    "onsetPeriod",
    "performedDateTime",
    "performedPeriod",
    "occurrenceDateTime",
    "occurrencePeriod",
    "period",
    "authoredOn",
    "recordedDate",
    "issued",
    "date",
    "created",
    "started",
];

fn clinical_period(resource: &Value) -> Option<Period> {
    CLINICAL_DATE_ELEMENTS
        .iter()
        .find_map(|name| match &resource[*name] {
            Value::String(text) => Some(Period {
                start: Some(parse_time(text, Bound::Start)?),
                end: Some(parse_time(text, Bound::End)?),
            }),
            Value::Object(_) => compile_period(&resource[*name], name).ok(),
            _ => None,
        })
}

/// Whether any `reference` inside the resource points at `target` (`Type/id`).
fn mentions(value: &Value, target: &str) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, item)| match (key.as_str(), item) {
            ("reference", Value::String(reference)) => {
                relative_reference(reference).as_deref() == Some(target)
            }
            _ => mentions(item, target),
        }),
        Value::Array(items) => items.iter().any(|item| mentions(item, target)),
        _ => false,
    }
}

/// Which end of a partial date a bound stands for.
#[derive(Clone, Copy)]
enum Bound {
    Start,
    End,
}

/// A FHIR date, dateTime or instant; a partial date stands for its first or last moment.
fn parse_time(text: &str, bound: Bound) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    let (year, month, day) = match text.len() {
        4 => (text.parse().ok()?, None, None),
        7 => (
            text[..4].parse().ok()?,
            Some(text[5..7].parse().ok()?),
            None,
        ),
        10 => (
            text[..4].parse().ok()?,
            Some(text[5..7].parse().ok()?),
            Some(text[8..10].parse().ok()?),
        ),
        _ => return None,
    };
    let first = chrono::NaiveDate::from_ymd_opt(year, month.unwrap_or(1), day.unwrap_or(1))?;
    let start = first.and_hms_opt(0, 0, 0)?.and_utc();
    match bound {
        Bound::Start => Some(start),
        Bound::End => {
            let next = match (month, day) {
                (_, Some(_)) => first.succ_opt()?,
                (Some(_), None) => first.checked_add_months(chrono::Months::new(1))?,
                (None, _) => first.with_year(year + 1)?,
            };
            Some(next.and_hms_opt(0, 0, 0)?.and_utc() - chrono::Duration::microseconds(1))
        }
    }
}

#[cfg(test)]
mod tests;
