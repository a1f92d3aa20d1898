//! One FHIR R4 `AuditEvent` per request, shaped after IHE Basic Audit Log Patterns (BALP,
//! <https://profiles.ihe.net/ITI/BALP/>).
//!
//! The server stores an [`AuditRecord`] for every request (allowed or denied, authentication
//! failures included); [`audit_event`] turns one record into the `AuditEvent` that compliance
//! officers read. The codes come from `audit/catalog.json` ([`Catalog`]), not from this file, so
//! the mapping an auditor reads in `audit/README.md` is the mapping the server applies.
//!
//! # Shape
//! | element | from |
//! |---|---|
//! | `id` | the record's sequence number (its leaf index in the Merkle tree) |
//! | `meta.profile` | the catalog's BALP profile (the `Patient*` variant when a compartment is known), only on success: BALP's patterns describe successful events |
//! | `type`, `subtype`, `action` | the catalog entry of the interaction |
//! | `recorded` | when the record was written, UTC, milliseconds |
//! | `outcome`, `outcomeDesc` | the catalog's HTTP-status ranges (0/4/8); the status and its standard reason phrase, nothing else |
//! | `purposeOfEvent` | the token's purpose of use (v3 `ActReason`, the system of the v3-PurposeOfUse value set) |
//! | `agent` | the user (token `sub`, `fhirUser`, roles, purpose of use; `requestor`), the client (OAuth `client_id`, network address), the server (its base URL) |
//! | `source` | observer "Custodian", site = tenant, type 4 Application Server |
//! | `entity` | the resource (`Type/id/_history/v`), the patient compartment pseudonym, the `X-Request-Id`, the keyed hash of the query |
//!
//! # What never appears
//! Names, birth dates, identifiers such as MRNs, query text and request bodies are not in the
//! record to begin with. This module adds defence in depth for the few fields a client can
//! influence: the id of a `Patient`, `RelatedPerson` or `Person` resource (and a `fhirUser` that
//! points at one) is dropped, because the patient appears only as the compartment pseudonym
//! (which survives erasure without re-identifying anyone); ids, request ids and network
//! addresses that do not have their expected syntax are dropped rather than copied; the query
//! appears only as the keyed hash the caller computed.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The interactions the catalog must cover, as [`AuditRecord::interaction`] names them.
pub const INTERACTIONS: [&str; 18] = [
    "read",
    "vread",
    "history-instance",
    "history-type",
    "history-system",
    "search-type",
    "search-system",
    "create",
    "update",
    "patch",
    "delete",
    "capabilities",
    "transaction",
    "batch",
    "operation",
    "everything",
    "erase",
    "login",
];

/// The catalog entry that unknown interactions fall back to.
const FALLBACK_INTERACTION: &str = "operation";

/// Identifier system of the patient compartment pseudonym.
pub const COMPARTMENT_SYSTEM: &str = "urn:custodian:compartment";
/// Coding system of the roles copied from the access token.
pub const ROLE_SYSTEM: &str = "urn:custodian:role";
/// Code system of purpose-of-use codes (TREAT, ETREAT, …): the v3-PurposeOfUse value set draws
/// its codes from v3 `ActReason`, which is also what BALP's examples use.
pub const PURPOSE_OF_USE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
const ENTITY_TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE_SYSTEM: &str =
    "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
const SOURCE_TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
/// The identifier system saying "the value is a URI" (used for the server's base URL).
const URI_SYSTEM: &str = "urn:ietf:rfc:3986";
/// Name of the observing application in `source.observer` and the server agent.
const OBSERVER: &str = "Custodian";

/// Resource types whose ids point at a natural person who is not a workforce member: never
/// copied into an AuditEvent (the patient appears only as the compartment pseudonym).
const PERSON_TYPES: [&str; 3] = ["Patient", "RelatedPerson", "Person"];

/// Upper bounds on what is copied from a record, so a hostile token cannot bloat the log.
const MAX_TEXT: usize = 256;
const MAX_ROLES: usize = 32;

/// What the server stores for one request; [`audit_event`] renders it.
///
/// Every field is either chosen by the server or taken from a verified token; none holds a
/// name, a patient id or query text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the audit log: the record's leaf index in the Merkle tree (0-based).
    pub sequence: u64,
    /// When the record was written.
    #[serde(with = "rfc3339")]
    pub recorded: DateTime<Utc>,
    /// The FHIR interaction (`read`, `search-type`, …) or `login` for an authentication failure.
    pub interaction: String,
    /// The resource type the request addressed, if any.
    pub resource_type: Option<String>,
    /// The logical id the request addressed or created, if any.
    pub resource_id: Option<String>,
    /// The version read or written, if known.
    pub version: Option<i64>,
    /// The HTTP status of the response.
    pub outcome: u16,
    /// The access token's `sub`.
    pub agent_subject: Option<String>,
    /// The OAuth `client_id` of the calling application.
    pub agent_client_id: Option<String>,
    /// The token's `fhirUser` (e.g. `Practitioner/123`).
    pub agent_fhir_user: Option<String>,
    /// The roles granted by the token.
    pub agent_roles: Vec<String>,
    /// The purpose of use the request was made under (e.g. `TREAT`, `ETREAT`).
    pub purpose_of_use: Option<String>,
    /// The peer's network address (IP, possibly with port).
    pub network_address: Option<String>,
    /// The patient compartment pseudonym: never a patient id or name.
    pub patient_pseudonym: Option<String>,
    /// The request id (`X-Request-Id`).
    pub request_id: String,
    /// Keyed hash of the query string; never the query itself, which may hold PHI.
    pub query_hash: Option<String>,
    /// The tenant the request was served for.
    pub tenant: String,
    /// The Consents that decided accesses of the request (and how); absent when none did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consent_decisions: Vec<ConsentDecision>,
    /// The break-the-glass session the request was made under, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency_session: Option<String>,
    /// How many consent denies the emergency declaration overrode.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub emergency_overrides: u32,
}

/// One consent decision an audit record keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentDecision {
    /// `Consent/{id}/_history/{version}`, or `default` for the configured default.
    pub consent: String,
    pub decision: crate::consent::Verdict,
}

/// Identifier system of break-the-glass sessions (`GET /_audit/break-glass` lists them).
pub const BREAK_GLASS_SYSTEM: &str = "urn:custodian:break-glass-session";

fn is_zero(count: &u32) -> bool {
    *count == 0
}

/// RFC 3339 text for `recorded`, so the record serializes the same whatever chrono features
/// the rest of the build enables.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|time| time.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// The codes one interaction produces, read from `audit/catalog.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// `AuditEvent.type` (a Coding).
    pub type_coding: Value,
    /// The one `AuditEvent.subtype` Coding.
    pub subtype_coding: Value,
    /// `AuditEvent.action`: one of C, R, U, D, E.
    pub action: String,
    /// Canonical URL of the BALP profile a successful event follows; empty when BALP defines
    /// no pattern for the interaction.
    pub profile: String,
    /// The BALP profile of a successful event that concerns a known patient compartment;
    /// empty when there is none.
    pub patient_profile: String,
    /// `agent.type` Coding of the user who made the request; `Null` for none.
    pub requester_type: Value,
    /// `agent.type` Coding of the client application / network peer.
    pub client_type: Value,
    /// `agent.type` Coding of this server.
    pub server_type: Value,
}

/// One range of HTTP statuses and the `AuditEvent.outcome` code it maps to.
#[derive(Debug, Clone, PartialEq)]
struct OutcomeRange {
    from: u16,
    to: u16,
    code: String,
}

/// The parsed `audit/catalog.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    version: String,
    entries: HashMap<String, CatalogEntry>,
    fallback: CatalogEntry,
    outcome_ranges: Vec<OutcomeRange>,
    outcome_otherwise: String,
    /// The subtype Coding added to every event of a break-the-glass request.
    emergency_subtype: Value,
}

impl Catalog {
    /// Reads and checks `audit_dir/catalog.json`.
    ///
    /// # Errors
    /// The file cannot be read, is not JSON, or does not have the catalog's shape (every
    /// interaction of [`INTERACTIONS`] with a type, subtype, action C/R/U/D/E, profiles and
    /// agent types; outcome ranges with codes 0/4/8/12 that do not overlap). The message names
    /// the file and the offending element.
    pub fn load(audit_dir: &Path) -> Result<Catalog, String> {
        let path = audit_dir.join("catalog.json");
        let text = std::fs::read_to_string(&path).map_err(|error| {
            format!("cannot read the audit catalog {}: {error}", path.display())
        })?;
        Catalog::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Parses the catalog from its JSON text (what [`Catalog::load`] does after reading).
    ///
    /// # Errors
    /// As [`Catalog::load`], without the file name.
    pub fn parse(text: &str) -> Result<Catalog, String> {
        let root: Value =
            serde_json::from_str(text).map_err(|error| format!("not valid JSON: {error}"))?;
        let root = root
            .as_object()
            .ok_or("the catalog must be a JSON object")?;
        for key in root.keys() {
            if !key.starts_with('_')
                && !matches!(
                    key.as_str(),
                    "interactions" | "outcome" | "emergency_override"
                )
            {
                return Err(format!(
                    "unknown key {key:?} (expected interactions, emergency_override, outcome, _…)"
                ));
            }
        }
        let version = match root.get("_version") {
            Some(Value::String(version)) if !version.is_empty() => version.clone(),
            _ => return Err("_version: expected a non-empty string".into()),
        };
        if !matches!(root.get("_source"), Some(Value::String(source)) if !source.is_empty()) {
            return Err("_source: expected a non-empty string".into());
        }

        let interactions = root
            .get("interactions")
            .and_then(Value::as_object)
            .ok_or("interactions: expected an object keyed by interaction")?;
        let mut entries = HashMap::new();
        for (name, value) in interactions {
            entries.insert(
                name.clone(),
                parse_entry(value, &format!("interactions.{name}"))?,
            );
        }
        if let Some(missing) = INTERACTIONS
            .iter()
            .find(|name| !entries.contains_key(**name))
        {
            return Err(format!("interactions: missing {missing:?}"));
        }
        let fallback = entries[FALLBACK_INTERACTION].clone();

        let (outcome_ranges, outcome_otherwise) = parse_outcome(root.get("outcome"))?;
        let emergency_subtype = root
            .get("emergency_override")
            .map(|override_entry| &override_entry["subtype"])
            .filter(|coding| coding["system"].is_string() && coding["code"].is_string())
            .cloned()
            .ok_or("emergency_override.subtype: expected a Coding with system and code")?;
        Ok(Catalog {
            version,
            entries,
            fallback,
            outcome_ranges,
            outcome_otherwise,
            emergency_subtype,
        })
    }

    /// The catalog's `_version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The entry for an interaction; unknown interactions map to the generic `rest`/`operation`
    /// entry (never panics).
    pub fn entry(&self, interaction: &str) -> &CatalogEntry {
        self.entries.get(interaction).unwrap_or(&self.fallback)
    }

    /// The `AuditEvent.outcome` code (`0`, `4`, `8` or `12`) for an HTTP status.
    pub fn outcome(&self, status: u16) -> &str {
        self.outcome_ranges
            .iter()
            .find(|range| (range.from..=range.to).contains(&status))
            .map_or(self.outcome_otherwise.as_str(), |range| range.code.as_str())
    }
}

fn parse_entry(value: &Value, at: &str) -> Result<CatalogEntry, String> {
    let object = value
        .as_object()
        .ok_or(format!("{at}: expected an object"))?;
    const KEYS: [&str; 6] = [
        "type",
        "subtype",
        "action",
        "profile",
        "patient_profile",
        "agents",
    ];
    for key in object.keys() {
        if !key.starts_with('_') && !KEYS.contains(&key.as_str()) {
            return Err(format!("{at}: unknown key {key:?}"));
        }
    }
    let action = match object.get("action") {
        Some(Value::String(action)) if ["C", "R", "U", "D", "E"].contains(&action.as_str()) => {
            action.clone()
        }
        other => {
            return Err(format!(
                "{at}.action: expected one of \"C\", \"R\", \"U\", \"D\", \"E\", got {}",
                other.map_or("nothing".to_string(), Value::to_string)
            ))
        }
    };
    let agents = object
        .get("agents")
        .and_then(Value::as_object)
        .ok_or(format!(
            "{at}.agents: expected an object with requester, client, server"
        ))?;
    for key in agents.keys() {
        if !["requester", "client", "server"].contains(&key.as_str()) {
            return Err(format!("{at}.agents: unknown key {key:?}"));
        }
    }
    Ok(CatalogEntry {
        type_coding: parse_coding(object.get("type"), &format!("{at}.type"))?,
        subtype_coding: parse_coding(object.get("subtype"), &format!("{at}.subtype"))?,
        action,
        profile: parse_canonical(object.get("profile"), &format!("{at}.profile"))?,
        patient_profile: parse_canonical(
            object.get("patient_profile"),
            &format!("{at}.patient_profile"),
        )?,
        requester_type: match agents.get("requester") {
            None | Some(Value::Null) => Value::Null,
            coding => parse_coding(coding, &format!("{at}.agents.requester"))?,
        },
        client_type: parse_coding(agents.get("client"), &format!("{at}.agents.client"))?,
        server_type: parse_coding(agents.get("server"), &format!("{at}.agents.server"))?,
    })
}

/// A Coding with a system, a code and an optional display; returned with keys in FHIR order.
fn parse_coding(value: Option<&Value>, at: &str) -> Result<Value, String> {
    let object = value.and_then(Value::as_object).ok_or(format!(
        "{at}: expected a Coding object with system and code"
    ))?;
    let mut coding = Map::new();
    for key in ["system", "code", "display"] {
        match object.get(key) {
            Some(Value::String(text)) if !text.is_empty() && text.trim() == text => {
                coding.insert(key.into(), Value::String(text.clone()));
            }
            None if key == "display" => {}
            _ => {
                return Err(format!(
                    "{at}.{key}: expected a non-empty string without surrounding spaces"
                ))
            }
        }
    }
    if let Some(key) = object
        .keys()
        .find(|key| !["system", "code", "display"].contains(&key.as_str()))
    {
        return Err(format!("{at}: unknown key {key:?} in a Coding"));
    }
    let code = coding["code"].as_str().unwrap_or_default();
    if code.split(' ').any(str::is_empty) || code.chars().any(|c| c.is_whitespace() && c != ' ') {
        return Err(format!("{at}.code: {code:?} is not a FHIR code"));
    }
    Ok(Value::Object(coding))
}

/// A profile canonical URL, or `null` / absent for "no profile" (returned as "").
fn parse_canonical(value: Option<&Value>, at: &str) -> Result<String, String> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(url))
            if (url.starts_with("https://") || url.starts_with("http://"))
                && !url.chars().any(char::is_whitespace) =>
        {
            Ok(url.clone())
        }
        Some(other) => Err(format!(
            "{at}: expected a canonical URL or null, got {other}"
        )),
    }
}

fn parse_outcome(value: Option<&Value>) -> Result<(Vec<OutcomeRange>, String), String> {
    let object = value
        .and_then(Value::as_object)
        .ok_or("outcome: expected an object with ranges and otherwise")?;
    let code = |value: Option<&Value>, at: &str| -> Result<String, String> {
        match value.and_then(|value| value.get("code")) {
            Some(Value::String(code)) if ["0", "4", "8", "12"].contains(&code.as_str()) => {
                Ok(code.clone())
            }
            other => Err(format!(
                "{at}.code: expected \"0\", \"4\", \"8\" or \"12\" (R4 audit-event-outcome), got {}",
                other.map_or("nothing".to_string(), Value::to_string)
            )),
        }
    };
    let ranges = object
        .get("ranges")
        .and_then(Value::as_array)
        .ok_or("outcome.ranges: expected an array")?;
    let mut parsed: Vec<OutcomeRange> = Vec::new();
    for (index, range) in ranges.iter().enumerate() {
        let at = format!("outcome.ranges[{index}]");
        let status = |key: &str| -> Result<u16, String> {
            range
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|status| u16::try_from(status).ok())
                .filter(|status| (100..=599).contains(status))
                .ok_or(format!(
                    "{at}.{key}: expected an HTTP status between 100 and 599"
                ))
        };
        let (from, to) = (status("from")?, status("to")?);
        if from > to {
            return Err(format!("{at}: from {from} is after to {to}"));
        }
        if let Some(other) = parsed
            .iter()
            .find(|other| from <= other.to && other.from <= to)
        {
            return Err(format!(
                "{at}: {from}-{to} overlaps {}-{}",
                other.from, other.to
            ));
        }
        parsed.push(OutcomeRange {
            from,
            to,
            code: code(Some(range), &at)?,
        });
    }
    let otherwise = code(object.get("otherwise"), "outcome.otherwise")?;
    Ok((parsed, otherwise))
}

/// The FHIR R4 `AuditEvent` (JSON) for one record, BALP-shaped; see the module documentation
/// for the mapping. `server_base_url` identifies this server in the server agent and the
/// observer (e.g. `https://fhir.example.org/r4`); ignored unless it is an http(s) URL.
pub fn audit_event(record: &AuditRecord, catalog: &Catalog, server_base_url: &str) -> Value {
    let entry = catalog.entry(&record.interaction);
    let outcome = catalog.outcome(record.outcome);
    let base_url = base_url(server_base_url);
    let pseudonym = record.patient_pseudonym.as_deref().and_then(text);

    let mut event = Map::new();
    event.insert("resourceType".into(), json!("AuditEvent"));
    event.insert("id".into(), json!(record.sequence.to_string()));
    let profile = if pseudonym.is_some() && !entry.patient_profile.is_empty() {
        &entry.patient_profile
    } else {
        &entry.profile
    };
    // BALP's patterns fix outcome = 0: a failed request follows no profile.
    if outcome == "0" && !profile.is_empty() {
        event.insert("meta".into(), json!({ "profile": [profile] }));
    }
    event.insert("type".into(), entry.type_coding.clone());
    if record.emergency_session.is_some() {
        event.insert(
            "subtype".into(),
            json!([entry.subtype_coding, catalog.emergency_subtype]),
        );
    } else {
        event.insert("subtype".into(), json!([entry.subtype_coding]));
    }
    event.insert("action".into(), json!(entry.action));
    event.insert(
        "recorded".into(),
        json!(record.recorded.to_rfc3339_opts(SecondsFormat::Millis, true)),
    );
    event.insert("outcome".into(), json!(outcome));
    event.insert("outcomeDesc".into(), json!(status_text(record.outcome)));
    let purpose = record
        .purpose_of_use
        .as_deref()
        .and_then(text)
        .map(|code| json!([{ "coding": [{ "system": PURPOSE_OF_USE_SYSTEM, "code": code }] }]));
    if let Some(purpose) = &purpose {
        event.insert("purposeOfEvent".into(), purpose.clone());
    }
    event.insert(
        "agent".into(),
        Value::Array(agents(record, entry, base_url, purpose.as_ref())),
    );
    let mut source = Map::new();
    if let Some(site) = text(&record.tenant) {
        source.insert("site".into(), json!(site));
    }
    source.insert("observer".into(), server_reference(base_url));
    source.insert(
        "type".into(),
        json!([{ "system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server" }]),
    );
    event.insert("source".into(), Value::Object(source));
    let entities = entities(record, pseudonym);
    if !entities.is_empty() {
        event.insert("entity".into(), Value::Array(entities));
    }
    Value::Object(event)
}

/// The user (when the token named one), the client (when its id or address is known), and
/// this server, in that order.
fn agents(
    record: &AuditRecord,
    entry: &CatalogEntry,
    base_url: Option<&str>,
    purpose: Option<&Value>,
) -> Vec<Value> {
    let mut agents = Vec::new();
    let subject = record.agent_subject.as_deref().and_then(text);
    let fhir_user = record
        .agent_fhir_user
        .as_deref()
        .and_then(fhir_user_reference);
    let has_user = subject.is_some() || fhir_user.is_some();
    if has_user {
        let mut user = Map::new();
        if !entry.requester_type.is_null() {
            user.insert("type".into(), json!({ "coding": [entry.requester_type] }));
        }
        let mut seen = HashSet::new();
        let roles: Vec<Value> = record
            .agent_roles
            .iter()
            .filter_map(|role| text(role))
            .filter(|role| seen.insert(role.clone()))
            .take(MAX_ROLES)
            .map(|role| json!({ "coding": [{ "system": ROLE_SYSTEM, "code": role }] }))
            .collect();
        if !roles.is_empty() {
            user.insert("role".into(), Value::Array(roles));
        }
        let mut who = Map::new();
        if let Some(reference) = fhir_user {
            who.insert("reference".into(), json!(reference));
        }
        if let Some(subject) = subject {
            who.insert("identifier".into(), json!({ "value": subject }));
        }
        user.insert("who".into(), Value::Object(who));
        user.insert("requestor".into(), json!(true));
        if let Some(purpose) = purpose {
            user.insert("purposeOfUse".into(), purpose.clone());
        }
        agents.push(Value::Object(user));
    }

    let client_id = record.agent_client_id.as_deref().and_then(text);
    let network = record.network_address.as_deref().and_then(network);
    if client_id.is_some() || network.is_some() {
        let mut client = Map::new();
        client.insert("type".into(), json!({ "coding": [entry.client_type] }));
        if let Some(client_id) = client_id {
            client.insert(
                "who".into(),
                json!({ "identifier": { "value": client_id } }),
            );
        }
        // Without a user, the application itself is the requester.
        client.insert("requestor".into(), json!(!has_user));
        if let Some((address, kind)) = network {
            client.insert(
                "network".into(),
                json!({ "address": address, "type": kind }),
            );
        }
        agents.push(Value::Object(client));
    }

    let mut server = Map::new();
    server.insert("type".into(), json!({ "coding": [entry.server_type] }));
    server.insert("who".into(), server_reference(base_url));
    server.insert("requestor".into(), json!(false));
    if let Some(base_url) = base_url {
        server.insert(
            "network".into(),
            json!({ "address": base_url, "type": "5" }),
        );
    }
    agents.push(Value::Object(server));
    agents
}

/// The resource, the patient compartment, the request id and the query hash.
fn entities(record: &AuditRecord, pseudonym: Option<String>) -> Vec<Value> {
    let mut entities = Vec::new();
    if let Some(resource_type) = record
        .resource_type
        .as_deref()
        .filter(|ty| is_fhir_type(ty))
    {
        let id = record.resource_id.as_deref().filter(|id| is_fhir_id(id));
        let what = match id {
            Some(id) if !PERSON_TYPES.contains(&resource_type) => {
                let mut reference = format!("{resource_type}/{id}");
                if let Some(version) = record.version.filter(|version| *version >= 1) {
                    reference.push_str(&format!("/_history/{version}"));
                }
                json!({ "reference": reference, "type": resource_type })
            }
            _ => json!({ "type": resource_type }),
        };
        entities.push(json!({
            "what": what,
            "type": { "system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object" },
            "role": { "system": OBJECT_ROLE_SYSTEM, "code": "4", "display": "Domain Resource" },
        }));
    }
    if let Some(pseudonym) = pseudonym {
        entities.push(json!({
            "what": {
                "type": "Patient",
                "identifier": { "system": COMPARTMENT_SYSTEM, "value": pseudonym },
            },
            "type": { "system": ENTITY_TYPE_SYSTEM, "code": "1", "display": "Person" },
            "role": { "system": OBJECT_ROLE_SYSTEM, "code": "1", "display": "Patient" },
        }));
    }
    if is_request_id(&record.request_id) {
        entities.push(json!({
            "what": { "identifier": { "value": record.request_id } },
            "type": { "system": BALP_ENTITY_TYPE_SYSTEM, "code": "XrequestId" },
        }));
    }
    for decision in &record.consent_decisions {
        // The Consent that decided, by version; `default` when the configured default did.
        let what = if decision.consent.starts_with("Consent/") {
            json!({ "reference": decision.consent, "type": "Consent" })
        } else {
            json!({ "type": "Consent", "display": "no Consent applied: the configured default" })
        };
        entities.push(json!({
            "what": what,
            "type": { "system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object" },
            "role": { "system": OBJECT_ROLE_SYSTEM, "code": "13", "display": "Security Resource" },
            "description": format!("consent decision: {}", decision.decision.code()),
        }));
    }
    if let Some(session) = record
        .emergency_session
        .as_deref()
        .filter(|id| is_fhir_id(id))
    {
        entities.push(json!({
            "what": { "identifier": { "system": BREAK_GLASS_SYSTEM, "value": session } },
            "type": { "system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object" },
            "role": { "system": OBJECT_ROLE_SYSTEM, "code": "13", "display": "Security Resource" },
            "description": format!(
                "break-the-glass session; consent denies overridden: {}",
                record.emergency_overrides
            ),
        }));
    }
    if let Some(hash) = record.query_hash.as_deref().filter(|hash| !hash.is_empty()) {
        entities.push(json!({
            "type": { "system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object" },
            "role": { "system": OBJECT_ROLE_SYSTEM, "code": "24", "display": "Query" },
            "query": base64::engine::general_purpose::STANDARD.encode(hash.as_bytes()),
        }));
    }
    entities
}

/// This server as a Reference: its base URL as identifier when known, and its name.
fn server_reference(base_url: Option<&str>) -> Value {
    match base_url {
        Some(url) => {
            json!({ "identifier": { "system": URI_SYSTEM, "value": url }, "display": OBSERVER })
        }
        None => json!({ "display": OBSERVER }),
    }
}

/// The server base URL without trailing slashes, if it is an http(s) URL without spaces.
fn base_url(url: &str) -> Option<&str> {
    let url = url.trim().trim_end_matches('/');
    let scheme_len = if url.starts_with("https://") {
        8
    } else if url.starts_with("http://") {
        7
    } else {
        return None;
    };
    (url.len() > scheme_len && !url.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then_some(url)
}

/// A FHIR string (or code) from free text: control characters dropped, runs of whitespace
/// collapsed to one space, at most [`MAX_TEXT`] characters; `None` when nothing is left.
fn text(raw: &str) -> Option<String> {
    let collapsed = raw
        .split_whitespace()
        .map(|word| word.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let bounded: String = collapsed.chars().take(MAX_TEXT).collect();
    let bounded = bounded.trim_end();
    (!bounded.is_empty()).then(|| bounded.to_string())
}

/// A resource type name: `[A-Z][A-Za-z]*`, at most 64 characters.
fn is_fhir_type(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name.chars().all(|c| c.is_ascii_alphabetic())
}

/// A FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// A request id as servers and proxies generate them (UUIDs and the like): no spaces, no
/// free text.
fn is_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:+/=".contains(c))
}

/// `fhirUser` as a reference (`Type/id` or an absolute URL ending in it), unless it points at
/// a person who is not a workforce member.
fn fhir_user_reference(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let absolute = raw.starts_with("https://") || raw.starts_with("http://");
    let mut segments = raw.rsplit('/');
    let (id, resource_type) = (segments.next()?, segments.next()?);
    let relative = segments.next().is_none();
    (is_fhir_id(id)
        && is_fhir_type(resource_type)
        && !PERSON_TYPES.contains(&resource_type)
        && (absolute || relative)
        && !raw.chars().any(|c| c.is_whitespace() || c.is_control()))
    .then(|| raw.to_string())
}

/// The network address and its R4 network-type code: `2` for an IP address (a port is
/// dropped), `1` for a machine name; anything else is not an address and is dropped.
fn network(raw: &str) -> Option<(String, &'static str)> {
    let raw = raw.trim();
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some((ip.to_string(), "2"));
    }
    if let Ok(socket) = raw.parse::<SocketAddr>() {
        return Some((socket.ip().to_string(), "2"));
    }
    let is_host = (1..=253).contains(&raw.len())
        && raw.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    is_host.then(|| (raw.to_ascii_lowercase(), "1"))
}

/// `outcomeDesc`: the status and its standard reason phrase (RFC 9110), nothing from the
/// request or response.
fn status_text(status: u16) -> String {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return format!("HTTP {status}"),
    };
    format!("HTTP {status} {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::path::PathBuf;

    fn audit_dir() -> PathBuf {
        std::env::var_os("CUSTODIAN_AUDIT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/audit")))
    }

    fn catalog() -> Catalog {
        Catalog::load(&audit_dir()).expect("the audit catalog loads")
    }

    const BASE: &str = "https://fhir.example.org/r4";

    fn record(interaction: &str, outcome: u16) -> AuditRecord {
        AuditRecord {
            sequence: 41,
            recorded: Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap()
                + chrono::Duration::milliseconds(89),
            interaction: interaction.into(),
            resource_type: Some("Observation".into()),
            resource_id: Some("obs-1".into()),
            version: Some(3),
            outcome,
            agent_subject: Some("user-7f3a".into()),
            agent_client_id: Some("ehr-app".into()),
            agent_fhir_user: Some("Practitioner/123".into()),
            agent_roles: vec!["practitioner".into()],
            purpose_of_use: Some("TREAT".into()),
            network_address: Some("192.0.2.10".into()),
            patient_pseudonym: Some("cmp-9d2c41e0".into()),
            request_id: "6f1c2b8e-0d5a-4a7e-9b1e-2c3d4e5f6a7b".into(),
            query_hash: None,
            tenant: "clinic-a".into(),
            consent_decisions: Vec::new(),
            emergency_session: None,
            emergency_overrides: 0,
        }
    }

    fn entity_with_role<'a>(event: &'a Value, role: &str) -> Option<&'a Value> {
        event["entity"]
            .as_array()?
            .iter()
            .find(|entity| entity["role"]["code"] == role)
    }

    #[test]
    fn the_catalog_covers_every_interaction_with_balp_codes() {
        let catalog = catalog();
        let expected = [
            ("read", "R"),
            ("vread", "R"),
            ("history-instance", "R"),
            ("history-type", "E"),
            ("history-system", "E"),
            ("search-type", "E"),
            ("search-system", "E"),
            ("create", "C"),
            ("update", "U"),
            ("patch", "U"),
            ("delete", "D"),
            ("capabilities", "R"),
            ("transaction", "E"),
            ("batch", "E"),
            ("operation", "E"),
            ("login", "E"),
        ];
        for (interaction, action) in expected {
            let entry = catalog.entry(interaction);
            assert_eq!(entry.action, action, "{interaction}");
            if interaction == "login" {
                assert_eq!(
                    entry.type_coding["system"],
                    "http://dicom.nema.org/resources/ontology/DCM"
                );
                assert_eq!(entry.type_coding["code"], "110114");
            } else {
                assert_eq!(
                    entry.type_coding["system"],
                    "http://terminology.hl7.org/CodeSystem/audit-event-type"
                );
                assert_eq!(entry.type_coding["code"], "rest");
                assert_eq!(
                    entry.subtype_coding["system"],
                    "http://hl7.org/fhir/restful-interaction"
                );
                assert_eq!(entry.subtype_coding["code"], interaction);
            }
        }
        let balp = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
        assert_eq!(catalog.entry("read").profile, format!("{balp}Read"));
        assert_eq!(
            catalog.entry("search-type").patient_profile,
            format!("{balp}PatientQuery")
        );
        assert_eq!(catalog.entry("delete").profile, format!("{balp}Delete"));
        assert!(catalog.entry("login").profile.is_empty());
        assert!(!catalog.version().is_empty());
    }

    #[test]
    fn codes_and_outcomes_match_the_catalog() {
        let catalog = catalog();
        let cases = [
            ("read", 200, "0", "HTTP 200 OK"),
            ("create", 201, "0", "HTTP 201 Created"),
            ("read", 403, "4", "HTTP 403 Forbidden"),
            ("vread", 404, "4", "HTTP 404 Not Found"),
            ("login", 401, "4", "HTTP 401 Unauthorized"),
            ("search-type", 500, "8", "HTTP 500 Internal Server Error"),
            ("update", 412, "4", "HTTP 412 Precondition Failed"),
            ("delete", 204, "0", "HTTP 204 No Content"),
            ("transaction", 503, "8", "HTTP 503 Service Unavailable"),
            ("history-type", 304, "0", "HTTP 304 Not Modified"),
        ];
        for (interaction, status, outcome, description) in cases {
            let event = audit_event(&record(interaction, status), &catalog, BASE);
            let entry = catalog.entry(interaction);
            assert_eq!(event["resourceType"], "AuditEvent");
            assert_eq!(event["id"], "41", "id = sequence");
            assert_eq!(event["type"], entry.type_coding, "{interaction}");
            assert_eq!(
                event["subtype"],
                json!([entry.subtype_coding]),
                "{interaction}"
            );
            assert_eq!(event["action"], entry.action.as_str(), "{interaction}");
            assert_eq!(event["outcome"], outcome, "{interaction} {status}");
            assert_eq!(event["outcomeDesc"], description);
            assert_eq!(event["recorded"], "2026-03-04T05:06:07.089Z");
        }
        assert_eq!(catalog.outcome(102), "8", "outside every range: otherwise");
        assert_eq!(catalog.outcome(699), "8");
        assert_eq!(status_text(299), "HTTP 299");
    }

    #[test]
    fn profiles_are_claimed_only_for_successes() {
        let catalog = catalog();
        let balp = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";
        let event = audit_event(&record("read", 200), &catalog, BASE);
        assert_eq!(
            event["meta"]["profile"],
            json!([format!("{balp}PatientRead")])
        );
        let mut no_patient = record("create", 201);
        no_patient.patient_pseudonym = None;
        let event = audit_event(&no_patient, &catalog, BASE);
        assert_eq!(event["meta"]["profile"], json!([format!("{balp}Create")]));
        for (interaction, status) in [
            ("read", 403),
            ("login", 401),
            ("search-type", 500),
            ("batch", 200),
        ] {
            let event = audit_event(&record(interaction, status), &catalog, BASE);
            assert!(
                event.get("meta").is_none(),
                "{interaction} {status}: {event}"
            );
        }
    }

    #[test]
    fn the_patient_appears_only_as_the_compartment_pseudonym() {
        let catalog = catalog();
        let mut patient_read = record("read", 200);
        patient_read.resource_type = Some("Patient".into());
        patient_read.resource_id = Some("mrn-004711".into());
        patient_read.agent_fhir_user = Some("Patient/mrn-004711".into());
        let event = audit_event(&patient_read, &catalog, BASE);
        let patient = entity_with_role(&event, "1").expect("a patient entity");
        assert_eq!(
            patient,
            &json!({
                "what": {
                    "type": "Patient",
                    "identifier": { "system": COMPARTMENT_SYSTEM, "value": "cmp-9d2c41e0" },
                },
                "type": { "system": ENTITY_TYPE_SYSTEM, "code": "1", "display": "Person" },
                "role": { "system": OBJECT_ROLE_SYSTEM, "code": "1", "display": "Patient" },
            })
        );
        let resource = entity_with_role(&event, "4").expect("a resource entity");
        assert_eq!(resource["what"], json!({ "type": "Patient" }));
        let text = event.to_string();
        assert!(!text.contains("mrn-004711"), "{text}");
        assert_eq!(text.matches("cmp-9d2c41e0").count(), 1, "{text}");

        let event = audit_event(&record("vread", 200), &catalog, BASE);
        let resource = entity_with_role(&event, "4").expect("a resource entity");
        assert_eq!(
            resource["what"]["reference"],
            "Observation/obs-1/_history/3"
        );
        assert_eq!(event["agent"][0]["who"]["reference"], "Practitioner/123");
    }

    #[test]
    fn nothing_phi_like_is_copied_from_other_fields() {
        let catalog = catalog();
        let canaries = ["Jane", "Doe", "1970-01-01", "555-0100"];
        let mut hostile = record("search-type", 200);
        hostile.resource_id = Some("Jane Doe 1970-01-01".into());
        hostile.agent_fhir_user = Some("RelatedPerson/Jane-Doe".into());
        hostile.network_address = Some("Jane Doe, 555-0100".into());
        hostile.request_id = "Jane Doe 1970-01-01".into();
        hostile.query_hash = Some("k1:9f86d081884c7d65".into());
        hostile.tenant = "clinic-a".into();
        let event = audit_event(&hostile, &catalog, BASE);
        let text = event.to_string();
        for canary in canaries {
            assert!(!text.contains(canary), "{canary} leaked: {text}");
        }
        let query = entity_with_role(&event, "24").expect("a query entity");
        assert_eq!(query["query"], "azE6OWY4NmQwODE4ODRjN2Q2NQ==");
        assert!(query.get("what").is_none());
        assert!(event["agent"][1].get("network").is_none());
        assert!(
            !text.contains("XrequestId"),
            "a free-text request id is dropped"
        );
    }

    #[test]
    fn agents_follow_balp() {
        let catalog = catalog();
        let mut emergency = record("read", 200);
        emergency.purpose_of_use = Some("ETREAT".into());
        emergency.agent_roles = vec!["practitioner".into(), "practitioner".into(), " ".into()];
        emergency.network_address = Some("[2001:db8::7]:54321".into());
        let event = audit_event(&emergency, &catalog, BASE);
        let purpose =
            json!([{ "coding": [{ "system": PURPOSE_OF_USE_SYSTEM, "code": "ETREAT" }] }]);
        assert_eq!(event["purposeOfEvent"], purpose);
        let agents = event["agent"].as_array().unwrap();
        assert_eq!(agents.len(), 3);
        let (user, client, server) = (&agents[0], &agents[1], &agents[2]);
        assert_eq!(user["requestor"], true);
        assert_eq!(user["who"]["identifier"]["value"], "user-7f3a");
        assert_eq!(
            user["role"],
            json!([{ "coding": [{ "system": ROLE_SYSTEM, "code": "practitioner" }] }])
        );
        assert_eq!(user["purposeOfUse"], purpose);
        assert!(
            user.get("network").is_none(),
            "BALP: users are not network devices"
        );
        assert_eq!(client["type"]["coding"][0]["code"], "110152");
        assert_eq!(client["who"]["identifier"]["value"], "ehr-app");
        assert_eq!(client["requestor"], false);
        assert_eq!(
            client["network"],
            json!({ "address": "2001:db8::7", "type": "2" })
        );
        assert_eq!(server["network"], json!({ "address": BASE, "type": "5" }));
        assert_eq!(event["source"]["site"], "clinic-a");
        assert_eq!(event["source"]["observer"]["display"], "Custodian");
        assert_eq!(event["source"]["type"][0]["code"], "4");

        let mut anonymous = record("login", 401);
        anonymous.agent_subject = None;
        anonymous.agent_fhir_user = None;
        anonymous.agent_client_id = None;
        anonymous.resource_type = None;
        anonymous.patient_pseudonym = None;
        let event = audit_event(&anonymous, &catalog, "not a url");
        let agents = event["agent"].as_array().unwrap();
        assert_eq!(agents.len(), 2, "client (by address) and server");
        assert_eq!(agents[0]["requestor"], true);
        assert_eq!(
            agents[0]["network"],
            json!({ "address": "192.0.2.10", "type": "2" })
        );
        assert_eq!(agents[1]["who"], json!({ "display": "Custodian" }));
        assert_eq!(
            network("lb-1.internal.example"),
            Some(("lb-1.internal.example".into(), "1"))
        );
    }

    #[test]
    fn unknown_interactions_fall_back_to_operation() {
        let catalog = catalog();
        let entry = catalog.entry("$frobnicate");
        assert_eq!(entry, catalog.entry("operation"));
        let event = audit_event(&record("", 200), &catalog, BASE);
        assert_eq!(event["subtype"][0]["code"], "operation");
        assert_eq!(event["type"]["code"], "rest");
    }

    #[test]
    fn load_errors_name_the_problem() {
        let missing = Catalog::load(Path::new("/nonexistent/audit")).unwrap_err();
        assert!(
            missing.contains("/nonexistent/audit/catalog.json"),
            "{missing}"
        );

        let text = std::fs::read_to_string(audit_dir().join("catalog.json")).unwrap();
        let good: Value = serde_json::from_str(&text).unwrap();
        let broken = |edit: &dyn Fn(&mut Value)| {
            let mut catalog = good.clone();
            edit(&mut catalog);
            Catalog::parse(&catalog.to_string()).unwrap_err()
        };
        let error = broken(&|c| c["interactions"]["read"]["action"] = json!("X"));
        assert!(error.contains("interactions.read.action"), "{error}");
        let error = broken(&|c| {
            c["interactions"].as_object_mut().unwrap().remove("patch");
        });
        assert!(error.contains("missing \"patch\""), "{error}");
        let error = broken(&|c| c["outcome"]["ranges"][1]["code"] = json!("5"));
        assert!(error.contains("outcome.ranges[1].code"), "{error}");
        let error = broken(&|c| c["outcome"]["ranges"][1]["from"] = json!(300));
        assert!(error.contains("overlaps"), "{error}");
        let error =
            broken(&|c| c["interactions"]["create"]["subtype"] = json!({ "code": "create" }));
        assert!(
            error.contains("interactions.create.subtype.system"),
            "{error}"
        );
        let error = broken(&|c| c["interactions"]["delete"]["profil"] = json!(null));
        assert!(error.contains("unknown key \"profil\""), "{error}");
        assert!(Catalog::parse("{").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn records_round_trip_through_serde() {
        let mut original = record("patch", 200);
        original.recorded += chrono::Duration::nanoseconds(123);
        let text = serde_json::to_string(&original).unwrap();
        assert!(
            text.contains("\"recorded\":\"2026-03-04T05:06:07.089000123Z\""),
            "{text}"
        );
        let back: AuditRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, original);
    }
}
