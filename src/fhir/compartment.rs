//! The patient compartment (http://hl7.org/fhir/R4/compartmentdefinition-patient.html): which
//! patient a resource belongs to. Every stored row carries its compartment, because the data key,
//! the access decision, consent and erasure are all per patient.
//!
//! The rules are data: `fhir-profiles/patient-compartment.json`, derived from the R4
//! CompartmentDefinition and the SearchParameter expressions by
//! `scripts/extract-patient-compartment.py`. A resource belongs to the patient named by the first
//! of its type's reference paths (in the definition's order, e.g. `Observation.subject` before
//! `Observation.performer`) that holds a `Patient/{id}` reference. A Patient is its own
//! compartment.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

/// Reference paths per resource type, e.g. `Observation` → `[["subject"], ["performer"]]`.
pub struct PatientCompartment {
    paths: HashMap<String, Vec<Vec<String>>>,
}

impl PatientCompartment {
    /// Loads `patient-compartment.json` from the profiles directory.
    ///
    /// # Errors
    /// A message naming the file when it is missing or malformed.
    pub fn load(profiles_dir: &Path) -> Result<Self, String> {
        let file = profiles_dir.join("patient-compartment.json");
        let text = std::fs::read_to_string(&file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let document: Value = serde_json::from_str(&text)
            .map_err(|error| format!("{} is not JSON: {error}", file.display()))?;
        let map = document["referencePaths"]
            .as_object()
            .ok_or_else(|| format!("{} has no referencePaths", file.display()))?;
        let mut paths = HashMap::new();
        for (resource_type, list) in map {
            let list = list
                .as_array()
                .ok_or_else(|| format!("referencePaths.{resource_type} is not a list"))?;
            let parsed = list
                .iter()
                .filter_map(Value::as_str)
                .map(|path| path.split('.').skip(1).map(str::to_string).collect())
                .collect();
            paths.insert(resource_type.clone(), parsed);
        }
        Ok(PatientCompartment { paths })
    }

    /// Whether resources of this type can belong to a patient compartment.
    pub fn is_compartment_type(&self, resource_type: &str) -> bool {
        self.paths.contains_key(resource_type)
    }

    /// The id of the Patient whose compartment holds `resource`, if any.
    pub fn patient_of(&self, resource_type: &str, id: &str, resource: &Value) -> Option<String> {
        if resource_type == "Patient" {
            return Some(id.to_string());
        }
        let paths = self.paths.get(resource_type)?;
        paths
            .iter()
            .find_map(|path| first_patient_reference(resource, path))
    }
}

/// Walks `path` through objects and arrays and returns the first `Patient/{id}` reference.
fn first_patient_reference(node: &Value, path: &[String]) -> Option<String> {
    match node {
        Value::Array(items) => items
            .iter()
            .find_map(|item| first_patient_reference(item, path)),
        Value::Object(map) => match path.split_first() {
            Some((head, rest)) => first_patient_reference(map.get(head)?, rest),
            None => map
                .get("reference")
                .and_then(Value::as_str)
                .and_then(patient_id_of_reference),
        },
        _ => None,
    }
}

/// The id in a relative or absolute literal reference to a Patient (`Patient/123`,
/// `https://host/fhir/Patient/123/_history/2`).
pub fn patient_id_of_reference(reference: &str) -> Option<String> {
    let without_version = match reference.find("/_history/") {
        Some(position) => &reference[..position],
        None => reference,
    };
    let mut segments = without_version.rsplit('/');
    let id = segments.next()?;
    let resource_type = segments.next()?;
    (resource_type == "Patient" && crate::fhir::is_valid_id(id)).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compartment() -> PatientCompartment {
        PatientCompartment::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir-profiles"))
            .unwrap()
    }

    #[test]
    fn first_patient_reference_in_definition_order_wins() {
        let compartment = compartment();
        let observation = json!({
            "resourceType": "Observation",
            "performer": [{"reference": "Patient/b"}],
            "subject": {"reference": "Patient/a"}
        });
        assert_eq!(
            compartment
                .patient_of("Observation", "o1", &observation)
                .as_deref(),
            Some("a")
        );
        let group_subject =
            json!({"resourceType": "Observation", "subject": {"reference": "Group/g"}});
        assert_eq!(
            compartment.patient_of("Observation", "o2", &group_subject),
            None
        );
    }

    #[test]
    fn nested_paths_arrays_and_absolute_references() {
        let compartment = compartment();
        let appointment = json!({
            "resourceType": "Appointment",
            "participant": [
                {"actor": {"reference": "Practitioner/p"}},
                {"actor": {"reference": "https://ehr.example/fhir/Patient/x/_history/3"}}
            ]
        });
        assert_eq!(
            compartment
                .patient_of("Appointment", "a1", &appointment)
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            compartment
                .patient_of("Patient", "self", &json!({}))
                .as_deref(),
            Some("self")
        );
        assert!(!compartment.is_compartment_type("Organization"));
        assert_eq!(
            compartment.patient_of("Organization", "o", &json!({})),
            None
        );
    }
}
