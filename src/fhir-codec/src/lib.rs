//! # fhir-codec
//!
//! The one place that instantiates fhirbolt's generic (de)serializers for the FHIR R4 `Resource`
//! enum. fhirbolt's serde code is monomorphized in every crate that calls it, and a single call
//! costs minutes of release build time; behind these non-generic functions it compiles once, and
//! the service crate that changes every day never recompiles it.
//!
//! What it offers:
//! - [`check_json`]: strict structural check of a JSON resource (unknown elements, wrong types,
//!   bad choice types, missing required elements) with the location of the first problem;
//! - [`xml_to_json`] and [`json_to_xml`]: conversion between the two FHIR wire formats;
//! - [`RESOURCE_TYPES`]: every R4 resource type fhirbolt models.
//!
//! Parsing always goes through the `Resource` enum: parsing into a concrete type (say `Bundle`)
//! fails when a nested resource precedes other fields.
//!
//! Error messages never repeat values from the input (they may be PHI): serde reports such as
//! ``invalid type: string "Jane"`` are redacted to ``invalid type: string``.

use fhirbolt::model::r4::Resource;
use fhirbolt::serde::{DeserializationConfig, DeserializationMode};

mod locate;
mod redact;

pub use locate::{json_path_at, json_path_of_unknown_key};

/// Maximum element nesting accepted in XML input. serde_json stops JSON at 128 levels by itself;
/// XML gets the same bound here so that a hostile document cannot exhaust the stack of the
/// recursive deserializer.
pub const MAX_XML_DEPTH: usize = 128;

/// A parse or conversion failure, safe to show to the client and to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    /// What is wrong, without any value taken from the input.
    pub message: String,
    /// Where, as a FHIRPath-like location (`Patient.name[0].given`), when it could be found.
    pub location: Option<String>,
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{} (at {location})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CodecError {}

fn strict() -> Option<DeserializationConfig> {
    Some(DeserializationConfig {
        mode: DeserializationMode::Strict,
    })
}

/// Parses JSON bytes strictly as an R4 resource and discards the result.
///
/// # Errors
/// A [`CodecError`] naming the first structural problem and, where serde_json reports a position,
/// the element path at that position.
pub fn check_json(bytes: &[u8]) -> Result<(), CodecError> {
    match fhirbolt::json::from_slice::<Resource>(bytes, strict()) {
        Ok(Resource::Invalid) => Err(CodecError {
            message: "not a FHIR R4 resource".into(),
            location: None,
        }),
        Ok(_) => Ok(()),
        Err(error) => {
            let message = error.to_string();
            let location = if error.line() > 0 {
                json_path_at(bytes, error.line(), error.column())
            } else {
                // fhirbolt buffers the resource before typing it, so its errors carry no
                // position; an unknown element can still be found by its name.
                locate_unknown_field(bytes, &message)
            };
            Err(CodecError {
                message: redact::friendly(&redact::serde_message(&message)),
                location,
            })
        }
    }
}

/// Finds `unknown field `x`, expected one of `a`, `b`` in the document.
fn locate_unknown_field(bytes: &[u8], message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let allowed: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    json_path_of_unknown_key(bytes, field, &allowed)
}

/// Parses an XML resource strictly and returns its JSON form.
///
/// # Errors
/// A [`CodecError`] when the XML is malformed, nested deeper than [`MAX_XML_DEPTH`], or not a
/// valid R4 resource.
pub fn xml_to_json(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    // FHIR XML is UTF-8, and fhirbolt's reader panics on an element name that is not (found by
    // the resource_json fuzz target): refuse such a body before it gets there.
    if std::str::from_utf8(bytes).is_err() {
        return Err(CodecError {
            message: "the XML is not valid UTF-8".into(),
            location: None,
        });
    }
    check_xml_depth(bytes)?;
    let resource =
        fhirbolt::xml::from_slice::<Resource>(bytes, strict()).map_err(|error| CodecError {
            message: redact::serde_message(&error.to_string()),
            location: None,
        })?;
    if matches!(resource, Resource::Invalid) {
        return Err(CodecError {
            message: "not a FHIR R4 resource".into(),
            location: None,
        });
    }
    fhirbolt::json::to_vec(&resource, None).map_err(|error| CodecError {
        message: format!(
            "cannot serialize as JSON: {}",
            redact::serde_message(&error.to_string())
        ),
        location: None,
    })
}

/// Converts a JSON resource (as stored: already checked) to FHIR XML.
///
/// # Errors
/// A [`CodecError`] if the JSON is not a valid resource (which for stored data means a bug).
pub fn json_to_xml(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    let resource =
        fhirbolt::json::from_slice::<Resource>(bytes, strict()).map_err(|error| CodecError {
            message: redact::serde_message(&error.to_string()),
            location: None,
        })?;
    fhirbolt::xml::to_vec(&resource, None).map_err(|error| CodecError {
        message: format!(
            "cannot serialize as XML: {}",
            redact::serde_message(&error.to_string())
        ),
        location: None,
    })
}

/// Checks a narrative's `div` (an xhtml value, as it appears in JSON): one well-formed element
/// named `div`, balanced and nested at most [`MAX_XML_DEPTH`] deep, with nothing but whitespace
/// around it. A resource whose narrative is not such XHTML has no XML form (fhirbolt's writer
/// parses the div into elements), so it would be stored but could never be served as XML.
///
/// # Errors
/// A [`CodecError`] saying what is wrong, without repeating the narrative.
pub fn check_xhtml(div: &str) -> Result<(), CodecError> {
    use quick_xml::events::Event;
    let invalid = |what: &str| CodecError {
        message: format!("the narrative div is not well-formed XHTML: {what}"),
        location: None,
    };
    // The reader skips a byte order mark at the start of its input, but inside the resource's
    // XML form it is text before the div and does not come back (found by fuzzing
    // `resource_json`).
    if div.starts_with('\u{feff}') {
        return Err(invalid("a byte order mark before the div"));
    }
    let mut reader = quick_xml::Reader::from_str(div);
    reader.check_end_names(true);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        let event = reader
            .read_event()
            .map_err(|_| invalid("malformed markup"))?;
        match event {
            Event::Start(start) => {
                check_attributes(&start).map_err(invalid)?;
                if depth == 0 {
                    roots += 1;
                    check_xhtml_root(&start).map_err(invalid)?;
                }
                depth += 1;
                if depth > MAX_XML_DEPTH {
                    return Err(invalid("nested too deeply"));
                }
            }
            Event::Empty(empty) => {
                check_attributes(&empty).map_err(invalid)?;
                if depth == 0 {
                    roots += 1;
                    check_xhtml_root(&empty).map_err(invalid)?;
                }
            }
            Event::End(_) => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| invalid("an end tag without its start"))?;
            }
            Event::Text(text) if depth == 0 && !text.iter().all(u8::is_ascii_whitespace) => {
                return Err(invalid("text outside the div"));
            }
            Event::CData(_) if depth == 0 => return Err(invalid("text outside the div")),
            Event::Eof => break,
            _ => {}
        }
    }
    match (depth, roots) {
        (0, 1) => Ok(()),
        (0, 0) => Err(invalid("no div element")),
        (0, _) => Err(invalid("more than one root element")),
        _ => Err(invalid("an element is not closed")),
    }
}

/// Every attribute of an element well-formed (`name="value"`, separated by whitespace, no name
/// twice): the reader only looks at attributes when asked, and the XML form of the resource is
/// read back by a parser that checks them all (found by fuzzing `resource_json`:
/// `<div xmlns="…"mA>` was accepted, and then had no readable XML form).
fn check_attributes(element: &quick_xml::events::BytesStart) -> Result<(), &'static str> {
    for attribute in element.attributes() {
        attribute.map_err(|_| "malformed attributes")?;
    }
    Ok(())
}

/// The narrative's root: a `div` in the XHTML namespace (fhirbolt reads no other back).
fn check_xhtml_root(root: &quick_xml::events::BytesStart) -> Result<(), &'static str> {
    if root.local_name().as_ref() != b"div" {
        return Err("the root element must be div");
    }
    let namespace = root
        .try_get_attribute("xmlns")
        .map_err(|_| "malformed attributes")?;
    match namespace {
        Some(attribute) if attribute.value.as_ref() == b"http://www.w3.org/1999/xhtml" => Ok(()),
        _ => Err("the div must declare the XHTML namespace"),
    }
}

/// Rejects XML nested deeper than [`MAX_XML_DEPTH`] before the recursive parser sees it.
fn check_xml_depth(bytes: &[u8]) -> Result<(), CodecError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut buffer = Vec::new();
    let mut depth = 0usize;
    loop {
        match reader.read_event_into(&mut buffer) {
            Ok(Event::Start(_)) => {
                depth += 1;
                if depth > MAX_XML_DEPTH {
                    return Err(CodecError {
                        message: format!("XML nested deeper than {MAX_XML_DEPTH} elements"),
                        location: None,
                    });
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Eof) => return Ok(()),
            Ok(_) => {}
            Err(error) => {
                return Err(CodecError {
                    message: format!(
                        "malformed XML: {}",
                        redact::serde_message(&error.to_string())
                    ),
                    location: None,
                })
            }
        }
        buffer.clear();
    }
}

/// Whether `name` is an R4 resource type fhirbolt models.
pub fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

/// Every R4 resource type of fhirbolt's `Resource` enum, sorted (binary search relies on it).
pub const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_type_list_is_sorted_and_matches_the_model() {
        assert!(RESOURCE_TYPES.windows(2).all(|pair| pair[0] < pair[1]));
        for name in RESOURCE_TYPES {
            // A known type fails (if at all) on missing required elements, never on the variant.
            let body = format!(r#"{{"resourceType":"{name}"}}"#);
            if let Err(error) = check_json(body.as_bytes()) {
                assert!(
                    !error.message.contains("expected valid resourceType"),
                    "{name}: {error}"
                );
            }
        }
        let unknown = check_json(br#"{"resourceType":"Spaceship"}"#).unwrap_err();
        assert!(unknown.message.contains("resourceType"), "{unknown}");
        assert!(!unknown.message.contains("Spaceship"), "{unknown}");
    }

    #[test]
    fn unknown_element_is_located_and_its_value_is_not_echoed() {
        let body = br#"{"resourceType":"Patient","name":[{"family":"Doe","nickname":"Secret"}]}"#;
        let error = check_json(body).unwrap_err();
        assert_eq!(error.location.as_deref(), Some("Patient.name[0].nickname"));
        assert!(!error.to_string().contains("Secret"));
    }

    #[test]
    fn wrong_primitive_type_is_redacted() {
        let body = br#"{"resourceType":"Patient","active":"Jane Doe"}"#;
        let error = check_json(body).unwrap_err();
        assert!(!error.to_string().contains("Jane"), "{error}");
        assert!(error.message.contains("boolean"), "{error}");
    }

    #[test]
    fn xml_that_is_not_utf8_is_refused_without_a_panic() {
        let mut xml = b"<P".to_vec();
        xml.extend_from_slice(&[0x9f, 0x8b]);
        xml.extend_from_slice(b" xmlns=\"http://hl7.org/fhir\"><id value=\"x\"/></P>");
        let error = xml_to_json(&xml).unwrap_err();
        assert_eq!(error.message, "the XML is not valid UTF-8");
    }

    #[test]
    fn xml_round_trip_and_depth_limit() {
        let json =
            br#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1970-01-01"}"#;
        let xml = json_to_xml(json).unwrap();
        let back = xml_to_json(&xml).unwrap();
        let original: serde_json::Value = serde_json::from_slice(json).unwrap();
        let converted: serde_json::Value = serde_json::from_slice(&back).unwrap();
        assert_eq!(original, converted);

        let deep = format!(
            "<Patient xmlns=\"http://hl7.org/fhir\">{}{}</Patient>",
            "<extension url=\"http://x\">".repeat(10_000),
            "</extension>".repeat(10_000)
        );
        let error = xml_to_json(deep.as_bytes()).unwrap_err();
        assert!(error.message.contains("nested deeper"), "{error}");
    }
}
