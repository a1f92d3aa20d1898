//! Element-level validation of FHIR R4 resources: primitive formats and required codes.
//!
//! fhirbolt checks that a resource has the right shape, but it stores primitives as plain
//! strings and numbers, so it accepts `"birthDate": "1990-13-01"`, a `dateTime` with a time
//! but no time zone, or `"gender": "robot"`. A FHIR server must not persist such data: other
//! systems will reject it, or worse, misread it. This module is the missing check. It walks
//! a resource in its JSON form (after fhirbolt has accepted it) and reports
//!
//! * every primitive whose value breaks the R4 datatype rules
//!   (<http://hl7.org/fhir/R4/datatypes.html>: the regular expressions of the 4.0.1
//!   primitive StructureDefinitions, plus the calendar and range checks a regex cannot
//!   express), including a JSON value of the wrong kind; and
//! * every `code` element whose value is outside a *required* value-set binding that the
//!   R4 definitions let us enumerate.
//!
//! Which element has which type and binding comes from `fhir-profiles/r4-elements.json`
//! and `fhir-profiles/r4-required-valuesets.json`, generated from the official HL7 FHIR
//! R4 4.0.1 definitions by `scripts/extract-fhir-profiles.py` (see `fhir-profiles/README.md`).
//!
//! It also reports an element written as an array where the definition does not let it repeat,
//! or as a single value where it may (fhirbolt accepts both).
//!
//! Deliberately out of scope, because fhirbolt or later stages own them: unknown elements,
//! cardinality counts (min/max), invariants (FHIRPath constraints), bindings on `Coding`/`CodeableConcept`
//! (many R4 "required" ones are extensible in practice) and value sets we cannot enumerate
//! (filters, external code systems): those are never checked, so a valid code is never
//! rejected.
//!
//! Messages never quote the offending value: resources carry PHI, and issues end up in
//! logs and OperationOutcomes.
//!
//! Decimals and integers are checked on their JSON text, which needs serde_json's
//! `arbitrary_precision` feature (enabled for the whole build by fhirbolt).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value};

/// One problem found, with a FHIRPath-like location such as `Patient.name[0].given[1]` or `Observation.valueQuantity.value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementIssue {
    pub path: String,
    pub message: String,
}

/// Objects nested deeper than this are reported instead of walked: real resources stay far
/// below it (a Questionnaire nesting items 20 deep is already unusual), and the bound keeps
/// a hostile document from exhausting the stack.
const MAX_DEPTH: usize = 64;

/// R4: "strings SHALL NOT exceed 1MB (1024*1024 characters) in size".
const MAX_STRING_CHARS: usize = 1024 * 1024;

/// ASCII whitespace as `\s` means in the spec's regexes (Java/XML Schema semantics, not
/// Unicode): a no-break space inside a code or URI is not whitespace there.
const WS: &[u8] = b" \t\n\r\x0B\x0C";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primitive {
    Base64Binary,
    Boolean,
    Canonical,
    Code,
    Date,
    DateTime,
    Decimal,
    Id,
    Instant,
    Integer,
    Markdown,
    Oid,
    PositiveInt,
    String,
    Time,
    UnsignedInt,
    Uri,
    Url,
    Uuid,
    Xhtml,
}

impl Primitive {
    fn from_code(code: &str) -> Option<Primitive> {
        Some(match code {
            "base64Binary" => Primitive::Base64Binary,
            "boolean" => Primitive::Boolean,
            "canonical" => Primitive::Canonical,
            "code" => Primitive::Code,
            "date" => Primitive::Date,
            "dateTime" => Primitive::DateTime,
            "decimal" => Primitive::Decimal,
            "id" => Primitive::Id,
            "instant" => Primitive::Instant,
            "integer" => Primitive::Integer,
            "markdown" => Primitive::Markdown,
            "oid" => Primitive::Oid,
            "positiveInt" => Primitive::PositiveInt,
            "string" => Primitive::String,
            "time" => Primitive::Time,
            "unsignedInt" => Primitive::UnsignedInt,
            "uri" => Primitive::Uri,
            "url" => Primitive::Url,
            "uuid" => Primitive::Uuid,
            "xhtml" => Primitive::Xhtml,
            _ => return None,
        })
    }
}

/// How to check the value found under one element name.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Primitive(Primitive),
    /// An object checked against the children of this node (datatype or backbone element).
    Complex(usize),
    /// An inline resource (`contained`, `Bundle.entry.resource`): checked by its own
    /// `resourceType`.
    Resource,
}

#[derive(Debug, Clone, Copy)]
struct Child {
    kind: Kind,
    /// Index into `Validator::value_sets`, for `code` elements with an enumerable
    /// required binding.
    value_set: Option<usize>,
    /// Whether the element may repeat (max above 1): FHIR JSON then writes it as an array,
    /// always, and otherwise never as one.
    repeats: bool,
}

impl Child {
    /// Bindings are only enforced on `code` elements: required bindings on
    /// CodeableConcept/Coding are too often treated as extensible in practice to reject on.
    fn new(kind: Kind, value_set: Option<usize>, repeats: bool) -> Child {
        let value_set = value_set.filter(|_| matches!(kind, Kind::Primitive(Primitive::Code)));
        Child {
            kind,
            value_set,
            repeats,
        }
    }
}

/// The elements allowed directly inside one kind of JSON object, by JSON property name
/// (choice elements are listed once per type: `valueQuantity`, `valueString`, ...).
type Node = HashMap<Box<str>, Child>;

struct ValueSet {
    url: Box<str>,
    codes: HashSet<Box<str>>,
}

/// Compiled once: the regexes of the R4 primitive definitions that are not simpler to
/// check by hand.
struct Patterns {
    id: Regex,
    oid: Regex,
    uuid: Regex,
    base64: Regex,
    decimal: Regex,
    integer: Regex,
}

impl Patterns {
    fn new() -> Result<Patterns, String> {
        let re = |p: &str| Regex::new(p).map_err(|e| format!("bad built-in regex {p}: {e}"));
        Ok(Patterns {
            id: re(r"\A[A-Za-z0-9\-\.]{1,64}\z")?,
            oid: re(r"\Aurn:oid:[0-2](\.(0|[1-9][0-9]*))+\z")?,
            uuid: re(r"\Aurn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\z")?,
            base64: re(r"\A([ \t\n\r\x0B\x0C]*[0-9a-zA-Z+/=]{4}[ \t\n\r\x0B\x0C]*)+\z")?,
            decimal: re(r"\A-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\z")?,
            integer: re(r"\A-?(0|[1-9][0-9]*)\z")?,
        })
    }
}

/// Loaded once at start-up, shared (Send + Sync).
pub struct Validator {
    nodes: Vec<Node>,
    /// Resource type name -> node of its root.
    resources: HashMap<Box<str>, usize>,
    /// Node for `Element` (id + extension): the shape of `_birthDate`-style objects.
    element: Option<usize>,
    /// Node for `Extension`, whose `url` is a plain string like an id.
    extension: Option<usize>,
    value_sets: Vec<ValueSet>,
    patterns: Patterns,
}

/// One step of the location of the value being checked. Paths are only rendered when an
/// issue is found, so the walk itself allocates nothing per element.
#[derive(Clone, Copy)]
enum Seg<'v> {
    Key(&'v str),
    Index(usize),
}

struct Walk<'v> {
    root: &'v str,
    path: Vec<Seg<'v>>,
    issues: Vec<ElementIssue>,
}

impl Walk<'_> {
    fn report(&mut self, message: String) {
        let mut path = String::with_capacity(self.root.len() + 8 * self.path.len());
        path.push_str(self.root);
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    path.push('.');
                    path.push_str(k);
                }
                Seg::Index(i) => {
                    let _ = write!(path, "[{i}]");
                }
            }
        }
        self.issues.push(ElementIssue { path, message });
    }
}

impl Validator {
    /// Loads r4-elements.json and r4-required-valuesets.json from the profiles directory.
    pub fn load(profiles_dir: &Path) -> Result<Validator, String> {
        let read = |name: &str| -> Result<Value, String> {
            let path = profiles_dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))
        };
        Validator::from_json(
            &read("r4-elements.json")?,
            &read("r4-required-valuesets.json")?,
        )
    }

    fn from_json(elements_doc: &Value, valuesets_doc: &Value) -> Result<Validator, String> {
        let types = elements_doc
            .get("types")
            .and_then(Value::as_object)
            .ok_or("r4-elements.json: missing \"types\" object")?;
        let elements = elements_doc
            .get("elements")
            .and_then(Value::as_object)
            .ok_or("r4-elements.json: missing \"elements\" object")?;
        let vs_map = valuesets_doc
            .get("valuesets")
            .and_then(Value::as_object)
            .ok_or("r4-required-valuesets.json: missing \"valuesets\" object")?;

        let mut value_sets = Vec::with_capacity(vs_map.len());
        let mut vs_index: HashMap<&str, usize> = HashMap::with_capacity(vs_map.len());
        for (url, codes) in vs_map {
            let codes = codes
                .as_array()
                .ok_or_else(|| format!("r4-required-valuesets.json: {url} is not a list"))?
                .iter()
                .filter_map(Value::as_str)
                .map(Box::from)
                .collect();
            vs_index.insert(url.as_str(), value_sets.len());
            value_sets.push(ValueSet {
                url: url.as_str().into(),
                codes,
            });
        }

        // One node per type root and per element that has children of its own (backbone
        // elements); contentReference and datatype references then point at these.
        let mut node_of: HashMap<&str, usize> = HashMap::new();
        for (name, kind) in types {
            if kind.as_str() != Some("primitive-type") {
                let next = node_of.len();
                node_of.entry(name.as_str()).or_insert(next);
            }
        }
        for path in elements.keys() {
            if let Some((parent, _)) = path.rsplit_once('.') {
                let next = node_of.len();
                node_of.entry(parent).or_insert(next);
            }
        }
        let mut nodes: Vec<Node> = vec![Node::new(); node_of.len()];

        let kind_of = |code: &str, path: &str| -> Option<Kind> {
            if let Some(p) = Primitive::from_code(code) {
                return Some(Kind::Primitive(p));
            }
            match code {
                "Resource" | "DomainResource" => Some(Kind::Resource),
                // Backbone elements are typed BackboneElement (resources) or Element
                // (datatypes); their children follow under their own path.
                "BackboneElement" | "Element" if node_of.contains_key(path) => {
                    Some(Kind::Complex(node_of[path]))
                }
                _ => node_of.get(code).map(|&n| Kind::Complex(n)),
            }
        };

        // Choice expansions go in after the explicit elements so that an explicit element
        // always wins a (hypothetical) name clash.
        let mut choices: Vec<(usize, String, Child)> = Vec::new();
        for (path, def) in elements {
            let Some((parent, leaf)) = path.rsplit_once('.') else {
                continue;
            };
            let node = node_of[parent];
            let value_set = def
                .get("b")
                .and_then(Value::as_str)
                .and_then(|url| vs_index.get(url).copied());
            let repeats = def.get("n").is_some();
            if let Some(target) = def.get("r").and_then(Value::as_str) {
                if let Some(&n) = node_of.get(target.trim_start_matches('#')) {
                    let child = Child::new(Kind::Complex(n), None, repeats);
                    nodes[node].insert(leaf.into(), child);
                }
                continue;
            }
            let codes = def
                .get("t")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                .unwrap_or_default();
            if let Some(stem) = leaf.strip_suffix("[x]") {
                for code in codes {
                    if let Some(kind) = kind_of(code, path) {
                        let mut name = String::with_capacity(stem.len() + code.len());
                        name.push_str(stem);
                        let mut chars = code.chars();
                        if let Some(first) = chars.next() {
                            name.extend(first.to_uppercase());
                            name.push_str(chars.as_str());
                        }
                        choices.push((node, name, Child::new(kind, value_set, repeats)));
                    }
                }
            } else if let Some(kind) = codes.first().and_then(|c| kind_of(c, path)) {
                nodes[node].insert(leaf.into(), Child::new(kind, value_set, repeats));
            }
        }
        for (node, name, child) in choices {
            nodes[node].entry(name.into()).or_insert(child);
        }

        let resources = types
            .iter()
            .filter(|(_, kind)| kind.as_str() == Some("resource"))
            .filter_map(|(name, _)| {
                node_of
                    .get(name.as_str())
                    .map(|&n| (Box::from(name.as_str()), n))
            })
            .collect();
        let element = node_of.get("Element").copied();
        let extension = node_of.get("Extension").copied();
        Ok(Validator {
            nodes,
            resources,
            element,
            extension,
            value_sets,
            patterns: Patterns::new()?,
        })
    }

    /// Every issue in one resource (empty = valid). `resource` is a JSON object with `resourceType`.
    pub fn validate(&self, resource: &serde_json::Value) -> Vec<ElementIssue> {
        let Some(obj) = resource.as_object() else {
            return Vec::new();
        };
        let Some((root, node)) = self.resource_node(obj) else {
            return Vec::new();
        };
        let mut walk = Walk {
            root,
            path: Vec::with_capacity(16),
            issues: Vec::new(),
        };
        self.walk_object(node, obj, &mut walk, 0);
        walk.issues
    }

    fn resource_node<'v>(&self, obj: &'v Map<String, Value>) -> Option<(&'v str, usize)> {
        let name = obj.get("resourceType")?.as_str()?;
        Some((name, *self.resources.get(name)?))
    }

    fn walk_object<'v>(
        &self,
        node: usize,
        obj: &'v Map<String, Value>,
        walk: &mut Walk<'v>,
        depth: usize,
    ) {
        if depth >= MAX_DEPTH {
            // Fail closed: content we could not look at is not silently accepted.
            walk.report(format!(
                "elements are nested more than {MAX_DEPTH} levels deep; the content below was not checked"
            ));
            return;
        }
        for (key, value) in obj {
            if let Some(rest) = key.strip_prefix('_') {
                // `_birthDate`: the id/extensions of a primitive, shaped like Element, and an
                // array exactly when the primitive is.
                // Resource.id, Element.id and Extension.url are plain strings (FHIRPath
                // System.String), not FHIR primitives: they have no id or extensions of their
                // own, and the XML form, where they are attributes, cannot carry them (found by
                // fuzzing: the id was lost there).
                let plain_string = match rest {
                    "id" => Some("an id cannot have extensions (`_id` is not allowed)"),
                    "url" if Some(node) == self.extension => {
                        Some("an extension's url cannot have extensions (`_url` is not allowed)")
                    }
                    _ => None,
                };
                if let Some(message) = plain_string {
                    walk.path.push(Seg::Key(key));
                    walk.report(message.into());
                    walk.path.pop();
                } else if !rest.is_empty() {
                    if let Some(element) = self.element {
                        walk.path.push(Seg::Key(key));
                        if let Some(primitive) = self.nodes[node].get(rest) {
                            check_repetition(primitive.repeats, value, walk);
                        }
                        self.walk_values(Kind::Complex(element), None, value, walk, depth);
                        walk.path.pop();
                    }
                }
                continue;
            }
            // Unknown names (and `resourceType`) are fhirbolt's business, not ours.
            let Some(child) = self.nodes[node].get(key.as_str()) else {
                continue;
            };
            walk.path.push(Seg::Key(key));
            check_repetition(child.repeats, value, walk);
            self.walk_values(child.kind, child.value_set, value, walk, depth);
            walk.path.pop();
        }
    }

    fn walk_values<'v>(
        &self,
        kind: Kind,
        value_set: Option<usize>,
        value: &'v Value,
        walk: &mut Walk<'v>,
        depth: usize,
    ) {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk.path.push(Seg::Index(i));
                    self.walk_value(kind, value_set, item, walk, depth);
                    walk.path.pop();
                }
            }
            _ => self.walk_value(kind, value_set, value, walk, depth),
        }
    }

    fn walk_value<'v>(
        &self,
        kind: Kind,
        value_set: Option<usize>,
        value: &'v Value,
        walk: &mut Walk<'v>,
        depth: usize,
    ) {
        // null stands in for array entries that only have `_name` extensions.
        if value.is_null() {
            return;
        }
        match kind {
            Kind::Primitive(p) => {
                if let Some(message) = self.check_primitive(p, value) {
                    walk.report(message);
                } else if let (Some(vs), Value::String(code)) = (value_set, value) {
                    let vs = &self.value_sets[vs];
                    if !vs.codes.contains(code.as_str()) {
                        walk.report(format!("code is not in the required value set {}", vs.url));
                    }
                }
            }
            Kind::Complex(node) => {
                if let Value::Object(obj) = value {
                    self.walk_object(node, obj, walk, depth + 1);
                }
            }
            Kind::Resource => {
                if let Value::Object(obj) = value {
                    if let Some((_, node)) = self.resource_node(obj) {
                        self.walk_object(node, obj, walk, depth + 1);
                    }
                }
            }
        }
    }

    /// `None` when `value` is a valid `p`; otherwise a message that does not quote it.
    fn check_primitive(&self, p: Primitive, value: &Value) -> Option<String> {
        let re = &self.patterns;
        match p {
            Primitive::Boolean => {
                if value.is_boolean() {
                    None
                } else {
                    Some("expected a JSON boolean (true or false) for a FHIR boolean".into())
                }
            }
            Primitive::Decimal => match value {
                Value::Number(n) if re.decimal.is_match(n.as_str()) => None,
                Value::Number(_) => Some("not a valid FHIR decimal".into()),
                _ => Some("expected a JSON number for a FHIR decimal".into()),
            },
            Primitive::Integer | Primitive::UnsignedInt | Primitive::PositiveInt => {
                let (name, min) = match p {
                    Primitive::Integer => ("integer", i64::from(i32::MIN)),
                    Primitive::UnsignedInt => ("unsignedInt", 0),
                    _ => ("positiveInt", 1),
                };
                let Value::Number(n) = value else {
                    return Some(format!("expected a JSON number for a FHIR {name}"));
                };
                let text = n.as_str();
                if !re.integer.is_match(text) {
                    return Some(format!(
                        "not a valid FHIR {name} (expected a whole number without fraction or exponent)"
                    ));
                }
                match text.parse::<i64>() {
                    Ok(v) if v >= min && v <= i64::from(i32::MAX) => None,
                    _ => Some(format!(
                        "FHIR {name} out of range (must be between {min} and {})",
                        i32::MAX
                    )),
                }
            }
            _ => {
                let Value::String(s) = value else {
                    return Some(format!(
                        "expected a JSON string for a FHIR {}",
                        string_type_name(p)
                    ));
                };
                self.check_string(p, s)
            }
        }
    }

    fn check_string(&self, p: Primitive, s: &str) -> Option<String> {
        let re = &self.patterns;
        if s.is_empty() {
            return Some(
                "empty string is not allowed (a FHIR primitive must have a value or be left out)"
                    .into(),
            );
        }
        // The 1 MB cap is on `string` and its specialisations only: base64Binary (Binary.data,
        // Attachment.data) and the other primitives may legitimately be larger.
        let string_like = matches!(
            p,
            Primitive::String | Primitive::Markdown | Primitive::Code | Primitive::Id
        );
        if string_like && s.len() > MAX_STRING_CHARS && s.chars().count() > MAX_STRING_CHARS {
            return Some("FHIR strings must not exceed 1 MB (1,048,576 characters)".into());
        }
        let bytes = s.as_bytes();
        let message = match p {
            // R4 regex `[ \r\n\t\S]+`: any text, but no vertical tab or form feed.
            Primitive::String | Primitive::Markdown => {
                if bytes.iter().any(|&b| b == 0x0B || b == 0x0C) {
                    "FHIR strings must not contain vertical tab or form feed characters"
                } else {
                    return None;
                }
            }
            // Well-formed, one div: else the resource could be stored but never served as XML.
            Primitive::Xhtml => {
                return fhir_codec::check_xhtml(s).err().map(|error| error.message);
            }
            Primitive::Code => {
                if is_code(bytes) {
                    return None;
                }
                "not a valid FHIR code (no leading, trailing or repeated whitespace)"
            }
            Primitive::Id => {
                if re.id.is_match(s) {
                    return None;
                }
                "not a valid FHIR id (1 to 64 characters from A-Z, a-z, 0-9, '-' and '.')"
            }
            Primitive::Uri | Primitive::Url | Primitive::Canonical => {
                if bytes.iter().any(|b| WS.contains(b)) {
                    "not a valid FHIR uri (must not contain whitespace)"
                } else {
                    return None;
                }
            }
            Primitive::Oid => {
                if re.oid.is_match(s) {
                    return None;
                }
                "not a valid FHIR oid (expected urn:oid: followed by a dotted number such as 1.2.3)"
            }
            Primitive::Uuid => {
                if re.uuid.is_match(s) {
                    return None;
                }
                "not a valid FHIR uuid (expected urn:uuid: followed by a lower-case RFC 4122 UUID)"
            }
            Primitive::Base64Binary => {
                if re.base64.is_match(s) {
                    return None;
                }
                "not valid FHIR base64Binary (base64 characters in groups of four)"
            }
            Primitive::Date => {
                if is_date(bytes) {
                    return None;
                }
                "not a valid FHIR date (expected YYYY, YYYY-MM or YYYY-MM-DD with a real calendar day)"
            }
            Primitive::DateTime => {
                if is_date_time(bytes, false) {
                    return None;
                }
                "not a valid FHIR dateTime (expected YYYY, YYYY-MM, YYYY-MM-DD or \
                 YYYY-MM-DDThh:mm:ss[.fff] with a time zone Z or +hh:mm/-hh:mm; \
                 the day must exist and the time must be a real time of day)"
            }
            Primitive::Instant => {
                if is_date_time(bytes, true) {
                    return None;
                }
                "not a valid FHIR instant (expected YYYY-MM-DDThh:mm:ss[.fff] with a time zone \
                 Z or +hh:mm/-hh:mm; the day must exist and the time must be a real time of day)"
            }
            Primitive::Time => {
                if is_time(bytes) == Some(bytes.len()) {
                    return None;
                }
                "not a valid FHIR time (expected hh:mm:ss[.fff], 00:00:00 to 23:59:59, no time zone)"
            }
            Primitive::Boolean
            | Primitive::Decimal
            | Primitive::Integer
            | Primitive::UnsignedInt
            | Primitive::PositiveInt => return None,
        };
        Some(message.into())
    }
}

fn string_type_name(p: Primitive) -> &'static str {
    match p {
        Primitive::Base64Binary => "base64Binary",
        Primitive::Canonical => "canonical",
        Primitive::Code => "code",
        Primitive::Date => "date",
        Primitive::DateTime => "dateTime",
        Primitive::Id => "id",
        Primitive::Instant => "instant",
        Primitive::Markdown => "markdown",
        Primitive::Oid => "oid",
        Primitive::Time => "time",
        Primitive::Uri => "uri",
        Primitive::Url => "url",
        Primitive::Uuid => "uuid",
        Primitive::Xhtml => "xhtml",
        _ => "string",
    }
}

/// R4 `code`: `[^\s]+(\s[^\s]+)*` — single whitespace characters between non-blank runs.
fn is_code(b: &[u8]) -> bool {
    let is_ws = |c: &u8| WS.contains(c);
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return false;
    };
    !is_ws(first) && !is_ws(last) && !b.windows(2).any(|w| is_ws(&w[0]) && is_ws(&w[1]))
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let s = b.get(at..at + n)?;
    s.iter().try_fold(0u32, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

/// Gregorian rule, as FHIR dates are Gregorian (ISO 8601): 1900 was not a leap year, 2000 was.
fn is_leap_year(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses the date part shared by date, dateTime and instant. Returns how many bytes it
/// used and whether it had a day (only a full date may be followed by a time).
fn date_prefix(b: &[u8]) -> Option<(usize, bool)> {
    let year = digits(b, 0, 4)?;
    if year == 0 {
        return None; // the R4 regex excludes year 0000
    }
    if b.get(4) != Some(&b'-') {
        return Some((4, false));
    }
    let month = digits(b, 5, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.get(7) != Some(&b'-') {
        return Some((7, false));
    }
    let day = digits(b, 8, 2)?;
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some((10, true))
}

fn is_date(b: &[u8]) -> bool {
    matches!(date_prefix(b), Some((n, _)) if n == b.len())
}

/// `hh:mm:ss(.f+)?` at the start of `b`; returns the bytes used. Seconds may be 60 (the
/// R4 regex allows a leap second); hour 24 is not allowed.
fn is_time(b: &[u8]) -> Option<usize> {
    let (h, m, s) = (digits(b, 0, 2)?, digits(b, 3, 2)?, digits(b, 6, 2)?);
    if b[2] != b':' || b[5] != b':' || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let mut n = 8;
    if b.get(8) == Some(&b'.') {
        let frac = b[9..].iter().take_while(|c| c.is_ascii_digit()).count();
        if frac == 0 {
            return None;
        }
        n = 9 + frac;
    }
    Some(n)
}

/// R4 dateTime (or instant, when `instant`): a partial or full date, or a full date with
/// time and a mandatory zone `Z` / `±hh:mm` (up to ±14:00).
fn is_date_time(b: &[u8], instant: bool) -> bool {
    let Some((n, full)) = date_prefix(b) else {
        return false;
    };
    if n == b.len() {
        return !instant;
    }
    if !full || b[n] != b'T' {
        return false;
    }
    let rest = &b[n + 1..];
    let Some(t) = is_time(rest) else {
        return false;
    };
    match &rest[t..] {
        [b'Z'] => true,
        [sign, ..] if *sign == b'+' || *sign == b'-' => {
            let zone = &rest[t + 1..];
            if zone.len() != 5 || zone[2] != b':' {
                return false;
            }
            match (digits(zone, 0, 2), digits(zone, 3, 2)) {
                (Some(h), Some(m)) => (h < 14 && m < 60) || (h == 14 && m == 0),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Reports an element written as an array where it cannot repeat, or as a single value where
/// it may (fhirbolt accepts both; other FHIR systems reject them, and the stored JSON would
/// differ from the same resource sent as XML).
fn check_repetition(repeats: bool, value: &Value, walk: &mut Walk<'_>) {
    match (repeats, value.is_array()) {
        (true, false) => {
            walk.report("this element may repeat: FHIR JSON requires an array, even of one".into());
        }
        (false, true) => {
            walk.report(
                "this element does not repeat: FHIR JSON requires a single value, not an array"
                    .into(),
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn profiles_dir() -> PathBuf {
        std::env::var_os("CUSTODIAN_PROFILES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fhir-profiles")))
    }

    fn validator() -> &'static Validator {
        static V: OnceLock<Validator> = OnceLock::new();
        V.get_or_init(|| Validator::load(&profiles_dir()).expect("load fhir-profiles"))
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "meta": {"lastUpdated": "2024-01-02T03:04:05.678Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
                            "period": {"start": "2001-05-06"}}],
            "active": true,
            "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"],
                      "period": {"start": "2001", "end": "2002-03"}}],
            "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1}],
            "gender": "male",
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
            "deceasedBoolean": false,
            "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille",
                         "postalCode": "3999", "period": {"start": "1974-12-25"}}],
            "multipleBirthInteger": 1,
            "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
                         "name": {"family": "du Marché", "_family": {"extension": [{"url": "http://example.org/x", "valueString": "VV"}]},
                                  "given": ["Bénédicte"], "period": {"start": "2012-01-01T10:00:00+01:00"}},
                         "gender": "female"}],
            "managingOrganization": {"reference": "Organization/1"}
        })
    }

    fn issues_for(resource: &Value) -> Vec<ElementIssue> {
        validator().validate(resource)
    }

    fn paths(issues: &[ElementIssue]) -> Vec<&str> {
        issues.iter().map(|i| i.path.as_str()).collect()
    }

    /// Issues of `resource` after setting `pointer` (a JSON pointer) to `value`.
    fn with(mut resource: Value, pointer: &str, value: Value) -> Vec<ElementIssue> {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = resource.pointer_mut(parent).unwrap();
        match target {
            Value::Object(m) => {
                m.insert(key.to_string(), value);
            }
            Value::Array(a) => a[key.parse::<usize>().unwrap()] = value,
            _ => panic!("bad pointer {pointer}"),
        }
        issues_for(&resource)
    }

    fn assert_no_value_leak(issues: &[ElementIssue], value: &str) {
        for i in issues {
            assert!(!i.message.contains(value), "message leaks the value: {i:?}");
        }
    }

    #[test]
    fn valid_patient_passes() {
        assert_eq!(issues_for(&patient()), vec![]);
    }

    #[test]
    fn repetition_follows_the_definition() {
        // A repeating element as a single object, and a single-valued one as an array (both
        // found accepted by fuzzing: the stored JSON then differed from the XML form).
        let name = with(patient(), "/name", json!({"family": "Chalmers"}));
        assert_eq!(paths(&name), vec!["Patient.name"]);
        assert!(name[0].message.contains("may repeat"), "{name:?}");
        let gender = with(patient(), "/gender", json!(["male"]));
        assert_eq!(paths(&gender), vec!["Patient.gender"]);
        assert!(gender[0].message.contains("does not repeat"), "{gender:?}");
        assert_no_value_leak(&gender, "male");
        // Inside a datatype, and a primitive's `_` sibling shaped like the primitive.
        let given = with(patient(), "/name/0/given", json!("Peter"));
        assert_eq!(paths(&given), vec!["Patient.name[0].given"]);
        let extensions = with(patient(), "/_gender", json!([{"id": "g"}]));
        assert_eq!(paths(&extensions), vec!["Patient._gender"]);
        let choice = with(patient(), "/deceasedBoolean", json!([false]));
        assert_eq!(paths(&choice), vec!["Patient.deceasedBoolean"]);
        // An id is a plain string: no `_id` beside it, at the root or inside a datatype.
        let root_id = with(
            patient(),
            "/_id",
            json!({"extension": [{"url": "http://x"}]}),
        );
        assert_eq!(paths(&root_id), vec!["Patient._id"]);
        let element_id = with(patient(), "/name/0/_id", json!({"id": "n"}));
        assert_eq!(paths(&element_id), vec!["Patient.name[0]._id"]);
        // So is an extension's url; `_url` elsewhere (a primitive named url) is fine.
        let extension = json!([{"url": "http://x", "_url": {"id": "u"}, "valueBoolean": true}]);
        let extension_url = with(patient(), "/extension", extension);
        assert_eq!(paths(&extension_url), vec!["Patient.extension[0]._url"]);
        let attachment = json!([{"url": "http://x/p.png", "_url": {"id": "p"}}]);
        assert_eq!(with(patient(), "/photo", attachment), vec![]);
        // Arrays of one and single values where they belong pass.
        assert_eq!(with(patient(), "/_gender", json!({"id": "g"})), vec![]);
        assert_eq!(with(patient(), "/name/0/given", json!(["Peter"])), vec![]);
    }

    #[test]
    fn impossible_birth_dates_fail() {
        for bad in [
            "1990-13-01",
            "1990-02-30",
            "1900-02-29",
            "1990-00-10",
            "0000",
            "1990-1-01",
            "19901",
            "1990-01-01T",
        ] {
            let issues = with(patient(), "/birthDate", json!(bad));
            assert_eq!(paths(&issues), ["Patient.birthDate"], "{bad}");
            assert!(issues[0].message.contains("FHIR date"), "{bad}");
            assert_no_value_leak(&issues, bad);
        }
        for good in [
            "2000-02-29",
            "1996-02-29",
            "1990",
            "1990-12",
            "0001-01-01",
            "9999-12-31",
        ] {
            assert_eq!(with(patient(), "/birthDate", json!(good)), vec![], "{good}");
        }
    }

    #[test]
    fn gender_must_come_from_the_required_value_set() {
        let issues = with(patient(), "/gender", json!("robot"));
        assert_eq!(paths(&issues), ["Patient.gender"]);
        assert_eq!(
            issues[0].message,
            "code is not in the required value set http://hl7.org/fhir/ValueSet/administrative-gender"
        );
        assert_no_value_leak(&issues, "robot");
        assert_eq!(with(patient(), "/gender", json!("female")), vec![]);
        // Malformed codes are reported as such, not as a binding problem.
        let issues = with(patient(), "/gender", json!(" female"));
        assert!(issues[0].message.contains("not a valid FHIR code"));
    }

    #[test]
    fn wrong_json_types_fail() {
        let issues = with(patient(), "/birthDate", json!(19901301));
        assert_eq!(paths(&issues), ["Patient.birthDate"]);
        assert_no_value_leak(&issues, "19901301");
        assert_eq!(
            paths(&with(patient(), "/active", json!("true"))),
            ["Patient.active"]
        );
        assert_eq!(
            paths(&with(patient(), "/multipleBirthInteger", json!("1"))),
            ["Patient.multipleBirthInteger"]
        );
        assert_eq!(
            paths(&with(patient(), "/multipleBirthInteger", json!(1.5))),
            ["Patient.multipleBirthInteger"]
        );
        assert_eq!(
            paths(&with(
                patient(),
                "/multipleBirthInteger",
                json!(2147483648u64)
            )),
            ["Patient.multipleBirthInteger"]
        );
        assert_eq!(
            paths(&with(patient(), "/telecom/0/rank", json!(0))),
            ["Patient.telecom[0].rank"]
        );
    }

    #[test]
    fn strings_and_identifiers() {
        assert_eq!(
            paths(&with(patient(), "/name/0/given/1", json!(""))),
            ["Patient.name[0].given[1]"]
        );
        assert_eq!(
            paths(&with(patient(), "/id", json!("has space"))),
            ["Patient.id"]
        );
        assert_eq!(
            paths(&with(patient(), "/id", json!("a".repeat(65)))),
            ["Patient.id"]
        );
        assert_eq!(with(patient(), "/id", json!("a".repeat(64))), vec![]);
        assert_eq!(
            paths(&with(patient(), "/identifier/0/system", json!("urn:x y"))),
            ["Patient.identifier[0].system"]
        );
        // A no-break space is not whitespace in the spec's (Java) regexes.
        assert_eq!(
            with(patient(), "/identifier/0/system", json!("urn:x\u{a0}y")),
            vec![]
        );
        assert_eq!(
            with(patient(), "/name/0/family", json!("  spaced  ")),
            vec![]
        );
    }

    #[test]
    fn size_limit_applies_to_strings_not_binary_data() {
        let long = "a".repeat(MAX_STRING_CHARS + 1);
        assert_eq!(
            paths(&with(patient(), "/name/0/family", json!(long))),
            ["Patient.name[0].family"]
        );
        // Multi-byte characters count as one: exactly 1,048,576 of them is still allowed.
        let wide = "é".repeat(MAX_STRING_CHARS);
        assert_eq!(with(patient(), "/name/0/family", json!(wide)), vec![]);
        let binary = json!({"resourceType": "Binary", "contentType": "application/pdf",
                            "data": "QUJD".repeat(MAX_STRING_CHARS / 2)});
        assert_eq!(issues_for(&binary), vec![]);
    }

    #[test]
    fn validator_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Validator>();
    }

    #[test]
    fn nested_datatypes_use_their_own_definitions() {
        let issues = with(
            patient(),
            "/contact/0/name/period/start",
            json!("2012-01-01T10:00:00"),
        );
        assert_eq!(paths(&issues), ["Patient.contact[0].name.period.start"]);
        assert!(issues[0].message.contains("FHIR dateTime"));
        let issues = with(patient(), "/contact/0/gender", json!("robot"));
        assert_eq!(paths(&issues), ["Patient.contact[0].gender"]);
    }

    #[test]
    fn primitive_extensions_are_elements() {
        // `_birthDate` objects are fine; their extensions are checked like any other.
        assert_eq!(
            paths(&with(
                patient(),
                "/_birthDate/extension/0/valueDateTime",
                json!("1974-12-25T14:35:45")
            )),
            ["Patient._birthDate.extension[0].valueDateTime"]
        );
        let mut p = patient();
        p["name"][0]["given"] = json!([null, "James"]);
        p["name"][0]["_given"] =
            json!([{"extension": [{"url": "http://example.org/x", "valueCode": "x"}]}, null]);
        assert_eq!(issues_for(&p), vec![]);
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2016-03-28T09:30:00+10:00",
            "issued": "2016-03-28T09:30:10.123+10:00",
            "valueQuantity": {"value": 67.50, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg",
                              "comparator": "<"},
            "component": [{"code": {"text": "x"}, "valueInteger": -3, "valuePeriod": {"start": "2016"}}]
        })
    }

    #[test]
    fn observation_choice_types() {
        assert_eq!(issues_for(&observation()), vec![]);
        let value: Value =
            serde_json::from_str(r#"{"value": 1.000000000000000000000001}"#).unwrap();
        assert_eq!(
            with(
                observation(),
                "/valueQuantity/value",
                value["value"].clone()
            ),
            vec![]
        );
        assert_eq!(
            paths(&with(observation(), "/valueQuantity/value", json!("67.5"))),
            ["Observation.valueQuantity.value"]
        );
        assert_eq!(
            paths(&with(
                observation(),
                "/valueQuantity/comparator",
                json!("~")
            )),
            ["Observation.valueQuantity.comparator"]
        );
        let issues = with(
            observation(),
            "/effectiveDateTime",
            json!("2016-03-28T09:30:00"),
        );
        assert_eq!(paths(&issues), ["Observation.effectiveDateTime"]);
        assert_no_value_leak(&issues, "2016-03-28T09:30:00");
        assert_eq!(
            paths(&with(observation(), "/issued", json!("2016-03-28"))),
            ["Observation.issued"]
        );
        assert_eq!(
            paths(&with(
                observation(),
                "/component/0/valuePeriod/start",
                json!("2016-02-30")
            )),
            ["Observation.component[0].valuePeriod.start"]
        );
        let issues = with(observation(), "/status", json!("bogus"));
        assert_eq!(paths(&issues), ["Observation.status"]);
        assert!(issues[0]
            .message
            .ends_with("http://hl7.org/fhir/ValueSet/observation-status"));
    }

    #[test]
    fn meta_last_updated_is_an_instant() {
        let issues = with(patient(), "/meta/lastUpdated", json!("2024-01-02"));
        assert_eq!(paths(&issues), ["Patient.meta.lastUpdated"]);
        assert!(issues[0].message.contains("FHIR instant"));
    }

    #[test]
    fn date_time_rules() {
        let ok = [
            "2018",
            "1973-06",
            "1905-08-23",
            "2015-02-07T13:28:17-05:00",
            "2017-01-01T00:00:00.000Z",
            "2017-01-01T00:00:00.123456789+14:00",
            "2016-12-31T23:59:60Z",
            "2017-01-01T00:00:00-13:59",
        ];
        for s in ok {
            assert!(is_date_time(s.as_bytes(), false), "{s}");
        }
        let bad = [
            "2015-02-07T13:28:17",
            "2015-02-07T13:28Z",
            "2015-02-07T24:00:00Z",
            "2015-02-07T13:60:00Z",
            "2015-02-07T13:28:17+14:30",
            "2015-02-07T13:28:17+1400",
            "2015-02-07T13:28:17.Z",
            "2015-02T13:28:17Z",
            "2015-02-29T13:28:17Z",
            "2015-02-07 13:28:17Z",
            "2015-02-07T13:28:17Zjunk",
            "15-02-07",
        ];
        for s in bad {
            assert!(!is_date_time(s.as_bytes(), false), "{s}");
        }
        assert!(is_date_time(b"2015-02-07T13:28:17.243+10:00", true));
        assert!(!is_date_time(b"2015-02-07", true));
        assert_eq!(is_time(b"23:59:59.5"), Some(10));
        assert_eq!(is_time(b"24:00:00"), None);
        assert_eq!(is_time(b"12:00"), None);
    }

    #[test]
    fn code_and_base64_rules() {
        assert!(is_code(b"a b"));
        assert!(!is_code(b"a  b"));
        assert!(!is_code(b" a"));
        assert!(!is_code(b"a\n"));
        let v = validator();
        assert!(v
            .check_string(Primitive::Base64Binary, "aGVsbG8=")
            .is_none());
        assert!(v
            .check_string(Primitive::Base64Binary, "aGVs\nbG8=")
            .is_none());
        assert!(v.check_string(Primitive::Base64Binary, "aGVsbG8").is_some());
        assert!(v.check_string(Primitive::Oid, "urn:oid:1.2.3").is_none());
        assert!(v.check_string(Primitive::Oid, "urn:oid:1.02.3").is_some());
        assert!(v
            .check_string(
                Primitive::Uuid,
                "urn:uuid:c757873d-ec9a-4326-a141-556f43239520"
            )
            .is_none());
        assert!(v
            .check_string(
                Primitive::Uuid,
                "urn:uuid:C757873D-EC9A-4326-A141-556F43239520"
            )
            .is_some());
    }

    #[test]
    fn contained_and_bundled_resources_are_checked_by_their_own_type() {
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Practitioner", "id": "pr1", "birthDate": "1990-02-30",
                                 "gender": "robot"}]);
        let issues = issues_for(&p);
        assert_eq!(
            paths(&issues),
            [
                "Patient.contained[0].birthDate",
                "Patient.contained[0].gender"
            ]
        );
        let bundle = json!({
            "resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": "urn:uuid:c757873d-ec9a-4326-a141-556f43239520", "resource": observation()},
                      {"resource": with_value(observation(), "/status", json!("bogus"))}]
        });
        assert_eq!(
            paths(&issues_for(&bundle)),
            ["Bundle.entry[1].resource.status"]
        );
    }

    fn with_value(mut v: Value, pointer: &str, value: Value) -> Value {
        *v.pointer_mut(pointer).unwrap() = value;
        v
    }

    #[test]
    fn content_references_and_extensions() {
        let q = json!({
            "resourceType": "Questionnaire", "status": "active",
            "item": [{"linkId": "1", "type": "group",
                      "item": [{"linkId": "1.1", "type": "robot", "item": [{"linkId": "1.1.1", "type": "date",
                                "initial": [{"valueDate": "2020-02-30"}]}]}]}],
            "extension": [{"url": "http://example.org/e", "valueInstant": "2020-01-01"}]
        });
        assert_eq!(
            paths(&issues_for(&q)),
            [
                "Questionnaire.item[0].item[0].type",
                "Questionnaire.item[0].item[0].item[0].initial[0].valueDate",
                "Questionnaire.extension[0].valueInstant"
            ]
        );
    }

    #[test]
    fn never_panics_on_odd_shapes() {
        let odd = [
            json!(null),
            json!([]),
            json!({}),
            json!({"resourceType": 5}),
            json!({"resourceType": "NoSuchThing", "birthDate": "x"}),
            json!({"resourceType": "Patient", "name": "x", "contact": [1, [2], null], "unknown": {"a": 1},
                   "_gender": 5, "_": {}, "birthDate": {"a": 1}, "contained": [{"resourceType": []}, 7]}),
        ];
        for v in odd {
            let _ = issues_for(&v);
        }
        // Deep nesting stops with one issue instead of recursing without bound.
        let mut ext = json!({"url": "http://example.org/x"});
        for _ in 0..200 {
            ext = json!({"url": "http://example.org/x", "extension": [ext]});
        }
        let issues = issues_for(&json!({"resourceType": "Patient", "extension": [ext]}));
        assert_eq!(issues.len(), 1);
        assert!(issues[0].message.contains("nested more than"));
    }

    /// The team's shared test data sits beside the repository (`../shared`), locally and
    /// in CI; the variable lets a checkout elsewhere point at it.
    fn examples_dir() -> Option<PathBuf> {
        let candidates = [
            std::env::var_os("CUSTODIAN_FHIR_EXAMPLES_DIR").map(PathBuf::from),
            // scripts/test finds the shared test data and exports its location.
            std::env::var_os("CUSTODIAN_TESTDATA")
                .map(|testdata| PathBuf::from(testdata).join("fhir-r4-examples")),
            Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/testdata/fhir-r4-examples"
            ))),
        ];
        candidates.into_iter().flatten().find(|p| p.is_dir())
    }

    /// Official examples that genuinely break an R4 rule, with the reason.
    const KNOWN_INVALID_EXAMPLES: &[(&str, &str)] = &[];

    #[test]
    fn official_r4_examples_are_valid() {
        let Some(dir) = examples_dir() else {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "the FHIR examples are required in CI (set CUSTODIAN_TESTDATA)"
            );
            eprintln!("*** SKIPPING: fhir-r4-examples directory not found ***");
            return;
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter(|p| {
                !p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("Bundle-")
            })
            .collect();
        files.sort();
        assert!(!files.is_empty());
        let mut unexpected = Vec::new();
        for file in &files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let resource: Value =
                serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            let issues = issues_for(&resource);
            let known = KNOWN_INVALID_EXAMPLES.iter().any(|(f, _)| *f == name);
            if issues.is_empty() == known {
                unexpected.push(format!("{name}: {issues:?}"));
            }
        }
        eprintln!("validated {} official examples", files.len());
        assert!(
            unexpected.is_empty(),
            "unexpected results:\n{}",
            unexpected.join("\n")
        );
    }

    /// Not a benchmark assertion: prints the cost of one Patient for the record
    /// (`cargo test --release validate_timing -- --nocapture`).
    #[test]
    fn validate_timing() {
        let v = validator();
        let p = patient();
        let n = 20_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            assert!(v.validate(std::hint::black_box(&p)).is_empty());
        }
        eprintln!("validate(Patient): {:?} per call", start.elapsed() / n);
    }
}
