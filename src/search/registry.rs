//! The search parameters Custodian serves: the official R4 SearchParameter definitions
//! (`fhir-profiles/search-parameters.json`, from HL7 FHIR R4 4.0.1), each with its FHIRPath
//! expression parsed once at start, and what the index may keep of its values in clear.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::fhirpath::Expression;
use super::query::{ParameterInfo, ParameterLookup};
use super::values::SearchType;

/// Resource types that describe a person: every string and date on them identifies someone.
const PEOPLE: &[&str] = &["Patient", "Person", "RelatedPerson", "Practitioner"];

/// Token parameters whose values are identifiers of a person or an encounter (MRN, SSN, phone
/// numbers, e-mail addresses), wherever they appear.
const IDENTIFYING_TOKENS: &[&str] = &["identifier", "telecom", "phone", "email"];

/// One component of a composite parameter.
#[derive(Debug)]
pub struct Component {
    pub code: String,
    pub search_type: SearchType,
    /// Relative to the composite's node.
    pub expression: Expression,
}

/// A search parameter as served on one resource type.
#[derive(Debug)]
pub struct ParamDef {
    pub code: String,
    pub search_type: SearchType,
    pub expression: Expression,
    pub targets: Vec<String>,
    pub components: Vec<Component>,
    /// Whether the index keeps its values only as keyed blind indexes (see the module docs
    /// of [`super::index`]).
    pub identifying: bool,
}

/// All parameters, by resource type then code.
#[derive(Debug, Default)]
pub struct Registry {
    by_type: HashMap<String, HashMap<String, Arc<ParamDef>>>,
    /// Parameters defined on `Resource` (and `DomainResource`): `_id`, `_lastUpdated`, …
    common: HashMap<String, Arc<ParamDef>>,
    /// Top-level elements `_summary=true` keeps, by resource type: those the specification
    /// marks isSummary, and the mandatory ones. A name ending in `[x]` is a choice stem.
    summary: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct Document {
    parameters: Vec<RawParameter>,
}

#[derive(Deserialize)]
struct RawParameter {
    code: String,
    base: Vec<String>,
    #[serde(rename = "type")]
    search_type: String,
    expression: Option<String>,
    #[serde(default)]
    target: Vec<String>,
    #[serde(default)]
    component: Vec<RawComponent>,
}

#[derive(Deserialize)]
struct RawComponent {
    code: String,
    #[serde(rename = "type")]
    search_type: String,
    expression: String,
}

impl Registry {
    /// Loads `search-parameters.json` from the profiles directory. `compartment_types` are the
    /// resource types of the patient compartment: their dates are tied to a person.
    ///
    /// # Errors
    /// A message when the file is missing or malformed.
    pub fn load(
        profiles_dir: &Path,
        is_compartment_type: impl Fn(&str) -> bool,
    ) -> Result<Registry, String> {
        let file = profiles_dir.join("search-parameters.json");
        let text = std::fs::read_to_string(&file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let document: Document = serde_json::from_str(&text)
            .map_err(|error| format!("{} is not valid: {error}", file.display()))?;
        let mut registry = Registry {
            summary: summary_elements(profiles_dir)?,
            ..Registry::default()
        };
        for raw in document.parameters {
            // Parameters without an expression (_content, _query, _text…) are not served.
            let Some(expression_text) = &raw.expression else {
                continue;
            };
            let Some(search_type) = SearchType::parse(&raw.search_type) else {
                continue;
            };
            if search_type == SearchType::Special {
                continue;
            }
            let expression = Expression::parse(expression_text)
                .map_err(|error| format!("search parameter {}: expression: {error}", raw.code))?;
            let components = raw
                .component
                .iter()
                .map(|component| {
                    Ok(Component {
                        code: component.code.clone(),
                        search_type: SearchType::parse(&component.search_type)
                            .ok_or_else(|| format!("component type of {}", raw.code))?,
                        expression: Expression::parse(&component.expression)
                            .map_err(|error| format!("component of {}: {error}", raw.code))?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            for base in &raw.base {
                let identifying =
                    is_identifying(&raw.code, search_type, base, &is_compartment_type);
                let definition = Arc::new(ParamDef {
                    code: raw.code.clone(),
                    search_type,
                    expression: expression.clone(),
                    targets: raw.target.clone(),
                    components: components
                        .iter()
                        .map(|component| Component {
                            code: component.code.clone(),
                            search_type: component.search_type,
                            expression: component.expression.clone(),
                        })
                        .collect(),
                    identifying,
                });
                if base == "Resource" || base == "DomainResource" {
                    registry.common.insert(raw.code.clone(), definition);
                } else {
                    registry
                        .by_type
                        .entry(base.clone())
                        .or_default()
                        .insert(raw.code.clone(), definition);
                }
            }
        }
        Ok(registry)
    }

    /// The parameter `code` on `resource_type` (or a common one).
    pub fn get(&self, resource_type: &str, code: &str) -> Option<&Arc<ParamDef>> {
        self.by_type
            .get(resource_type)
            .and_then(|parameters| parameters.get(code))
            .or_else(|| self.common.get(code))
    }

    /// Every parameter served on `resource_type`, common ones included.
    pub fn all_of<'a>(&'a self, resource_type: &str) -> impl Iterator<Item = &'a Arc<ParamDef>> {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flat_map(|parameters| parameters.values())
            .chain(self.common.values())
    }

    /// The parameters of `resource_type` alone (for the CapabilityStatement).
    pub fn own_of<'a>(&'a self, resource_type: &str) -> impl Iterator<Item = &'a Arc<ParamDef>> {
        self.by_type
            .get(resource_type)
            .into_iter()
            .flat_map(|parameters| parameters.values())
    }

    /// Whether `_summary=true` keeps the top-level element `name` (as in JSON: `valueQuantity`
    /// for `value[x]`) of a `resource_type`.
    pub fn in_summary(&self, resource_type: &str, name: &str) -> bool {
        self.summary.get(resource_type).is_some_and(|names| {
            names.iter().any(|kept| match kept.strip_suffix("[x]") {
                Some(stem) => name
                    .strip_prefix(stem)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())),
                None => kept == name,
            })
        })
    }

    /// The common parameters (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`).
    pub fn common(&self) -> impl Iterator<Item = &Arc<ParamDef>> {
        self.common.values()
    }
}

impl ParameterLookup for Registry {
    fn lookup(&self, resource_type: &str, code: &str) -> Option<ParameterInfo> {
        let definition = self.get(resource_type, code)?;
        Some(ParameterInfo {
            search_type: definition.search_type,
            targets: definition.targets.clone(),
            components: definition
                .components
                .iter()
                .map(|component| component.search_type)
                .collect(),
        })
    }
}

/// The summary elements of every type, from `r4-elements.json` (`s`/`m` flags).
fn summary_elements(profiles_dir: &Path) -> Result<HashMap<String, Vec<String>>, String> {
    let file = profiles_dir.join("r4-elements.json");
    let text = std::fs::read_to_string(&file)
        .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| format!("{} is not valid: {error}", file.display()))?;
    let mut summary: HashMap<String, Vec<String>> = HashMap::new();
    if let Some(elements) = document
        .get("elements")
        .and_then(serde_json::Value::as_object)
    {
        for (path, definition) in elements {
            let Some((resource_type, name)) = path.split_once('.') else {
                continue;
            };
            if name.contains('.') {
                continue;
            }
            let flagged = |flag: &str| definition.get(flag).is_some();
            if flagged("s") || flagged("m") {
                summary
                    .entry(resource_type.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
    }
    Ok(summary)
}

/// Whether values of this parameter identify a person (HIPAA's identifiers: names, addresses,
/// telecom, record numbers, and all elements of dates except the year directly related to an
/// individual), so the index may keep them only blinded.
fn is_identifying(
    code: &str,
    search_type: SearchType,
    resource_type: &str,
    is_compartment_type: &impl Fn(&str) -> bool,
) -> bool {
    let person = PEOPLE.contains(&resource_type);
    match search_type {
        // Free text in a patient's record (a value string, a note) may name or describe them.
        SearchType::String => {
            person
                || is_compartment_type(resource_type)
                || code.starts_with("address")
                || code == "phonetic"
        }
        SearchType::Token => IDENTIFYING_TOKENS.contains(&code) || code.ends_with("-identifier"),
        // Server metadata (when a version was written) is not a fact about the person.
        SearchType::Date => {
            code != "_lastUpdated" && (person || is_compartment_type(resource_type))
        }
        _ => false,
    }
}
