//! The CapabilityStatement served at `GET /metadata`. It states exactly what this build
//! implements (and the integration suite checks each claim against the server).

use serde_json::{json, Value};

use crate::search::registry::{ParamDef, Registry};
use crate::search::values::SearchType;

/// Resource types this server accepts at its RESTful endpoints: every R4 type fhirbolt models,
/// except those the specification or this server does not persist through the REST API.
pub fn served_resource_types() -> impl Iterator<Item = &'static str> {
    fhir_codec::RESOURCE_TYPES
        .iter()
        .copied()
        .filter(|name| !NOT_SERVED.contains(name))
}

/// Not served: `OperationOutcome` and `Parameters` are messages, not stored resources;
/// `AuditEvent` is written only by the server's own audit log, never through the API.
pub const NOT_SERVED: &[&str] = &["AuditEvent", "OperationOutcome", "Parameters"];

/// Whether `name` is served at `/{name}`.
pub fn is_served(name: &str) -> bool {
    fhir_codec::is_resource_type(name) && !NOT_SERVED.contains(&name)
}

/// The Bulk Data Access IG's server CapabilityStatement, which this server instantiates.
const BULK_DATA_CAPABILITY: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";

/// The Bulk Data `$export` operation declared at system level (`""`), on Patient and on Group.
fn bulk_export_operation(resource_type: &str) -> Option<Value> {
    let definition = match resource_type {
        "" => "export",
        "Patient" => "patient-export",
        "Group" => "group-export",
        _ => return None,
    };
    Some(json!({
        "name": "export",
        "definition": format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{definition}"),
        "documentation": "FHIR Bulk Data v2 kick-off (Prefer: respond-async): NDJSON output \
            encrypted at rest, served only to the requester, expiring (see README, Bulk Data)",
    }))
}

/// The CapabilityStatement for a server at `base_url`.
pub fn capability_statement(base_url: &str, released: &str, registry: &Registry) -> Value {
    let interactions = [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    let parameter = |definition: &ParamDef| json!({ "name": definition.code, "type": definition.search_type.as_str() });
    let mut resources: Vec<Value> = served_resource_types()
        .map(|name| {
            let mut parameters: Vec<&std::sync::Arc<ParamDef>> = registry.own_of(name).collect();
            parameters.sort_by(|a, b| a.code.cmp(&b.code));
            let includes: Vec<String> = parameters
                .iter()
                .filter(|definition| definition.search_type == SearchType::Reference)
                .map(|definition| format!("{name}:{}", definition.code))
                .collect();
            let mut entry = json!({
                "type": name,
                "interaction": interactions.iter().map(|code| json!({ "code": code })).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
            });
            // FHIR forbids empty arrays (and the XML writer rejects them).
            if !parameters.is_empty() {
                entry["searchParam"] = parameters.iter().map(|definition| parameter(definition)).collect();
            }
            if !includes.is_empty() {
                entry["searchInclude"] = json!(includes);
            }
            if let Some(operation) = bulk_export_operation(name) {
                entry["operation"] = json!([operation]);
            }
            entry
        })
        .collect();
    // Patient operations besides $export: $everything (the specification's definition) and
    // $erase (this server's, served at /OperationDefinition/erase).
    if let Some(patient) = resources
        .iter_mut()
        .find(|resource| resource["type"] == "Patient")
    {
        let mut operations = patient["operation"].as_array().cloned().unwrap_or_default();
        operations.extend([
            json!({
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                "documentation": "start, end, _since, _type, _count; filtered by the access decision"
            }),
            json!({
                "name": "erase",
                "definition": format!("{base_url}/OperationDefinition/erase"),
                "documentation": "crypto-shredding erasure of the patient's compartment (POST; \
                    compliance-officer; 409 under legal hold)"
            }),
        ]);
        patient["operation"] = json!(operations);
    }
    // AuditEvents are written only by the server's audit log; compliance roles read and search.
    resources.push(json!({
        "type": "AuditEvent",
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
        "searchParam": [
            { "name": "patient", "type": "reference" },
            { "name": "agent", "type": "token", "documentation": "the agent's token subject" },
            { "name": "date", "type": "date" },
            { "name": "type", "type": "token" },
            { "name": "subtype", "type": "token" },
            { "name": "outcome", "type": "token" },
            { "name": "entity", "type": "reference" }
        ]
    }));
    let mut common: Vec<Value> = registry
        .common()
        .map(|definition| parameter(definition))
        .collect();
    common.sort_by_key(|value| value["name"].as_str().map(str::to_string));
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": released,
        "publisher": "Custodian",
        "kind": "instance",
        "software": { "name": "Custodian", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": "Custodian FHIR R4 server",
            "url": base_url
        },
        "instantiates": [BULK_DATA_CAPABILITY],
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        "rest": [{
            "mode": "server",
            "documentation": "Search: every R4 search parameter, evaluated on decrypted resources; \
                identifying values are indexed only as keyed blind indexes (see README, Search).",
            "security": {
                "service": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }] }],
                "description": "OAuth 2.0 bearer tokens (JWT) with SMART App Launch v2 scopes \
                    (see /.well-known/smart-configuration), a Casbin access policy, and the \
                    patient's active patient-privacy Consents on every read, search and history; \
                    emergency access by header X-Break-Glass with a reason, time-boxed and \
                    audited (DCM 110127)"
            },
            "resource": resources,
            "interaction": [{ "code": "history-system" }, { "code": "search-system" }],
            "searchParam": common,
            "operation": [bulk_export_operation("").unwrap_or_default()]
        }]
    })
}
