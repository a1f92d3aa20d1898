//! Search values: FHIR elements turned into the typed values that search compares
//! (<http://hl7.org/fhir/R4/search.html>).
//!
//! [`extract`] evaluates a SearchParameter's expression on a resource and converts every node by
//! its FHIR type: the evaluator's type hint for choice elements, otherwise the element's JSON
//! shape (an object with `coding` is a CodeableConcept, one with `reference` a Reference, ...).
//! The search parameter's type picks which reading of an element is wanted: a HumanName gives
//! strings to a string parameter and nothing to a token parameter.
//!
//! # Conventions
//! - Dates are half-open ranges `[low, high)` in microseconds since the Unix epoch, UTC, wide as
//!   the value's precision: `2013-01` covers all of January. A date or dateTime without a time
//!   zone is taken as UTC. (The specification says the server's local time; UTC keeps the index
//!   independent of where the server runs, and is what a server in UTC would do anyway.)
//! - Numbers and quantities carry the range their written precision implies: `5.4` stands for
//!   `[5.35, 5.45)`, `100` for `[99.5, 100.5)`. The decimal's text is read exactly (the crate
//!   enables serde_json's `arbitrary_precision`, so `5.40` keeps its trailing zero).
//! - Strings are returned as written; [`normalize_string`] is applied by whoever compares them,
//!   to both sides.
//! - Composite and special parameters yield nothing here: their values are built by the caller
//!   (composites from [`node_values`] on each component's nodes).

use serde_json::{Map, Number, Value};

use super::fhirpath::{self, Expression, Node};

/// The `urn:iso:std:iso:4217` system that FHIR gives currency codes, used for Money.
const CURRENCY_SYSTEM: &str = "urn:iso:std:iso:4217";

/// ContactPoint.system's required codes; an object with one of them beside a `value` is a
/// ContactPoint, not an Identifier (whose system is a URI).
const CONTACT_POINT_SYSTEMS: &[&str] = &["phone", "fax", "email", "pager", "url", "sms", "other"];

/// A SearchParameter's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl SearchType {
    /// The type from its FHIR code (`"token"`); `None` for an unknown code.
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "number" => Self::Number,
            "date" => Self::Date,
            "string" => Self::String,
            "token" => Self::Token,
            "reference" => Self::Reference,
            "composite" => Self::Composite,
            "quantity" => Self::Quantity,
            "uri" => Self::Uri,
            "special" => Self::Special,
            _ => return None,
        })
    }

    /// The FHIR code, as [`SearchType::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Date => "date",
            Self::String => "string",
            Self::Token => "token",
            Self::Reference => "reference",
            Self::Composite => "composite",
            Self::Quantity => "quantity",
            Self::Uri => "uri",
            Self::Special => "special",
        }
    }
}

/// One value of a search parameter on a resource.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// One searchable string as written (not normalised): a HumanName part (family, given,
    /// prefix, suffix, text), an Address part (line, city, district, state, postalCode,
    /// country, text), a CodeableConcept's text or a Coding's display, the `text` of another
    /// object (a name known only by its text, an Annotation), or a plain string.
    String(String),
    /// A code. `system` may be absent, and `code` too (a CodeableConcept known only by its
    /// text); `text` is what the `:text` modifier searches (Coding.display,
    /// CodeableConcept.text, Identifier.type.text). A CodeableConcept gives one token per
    /// coding, with that coding's display, plus a text-only token for its own text.
    /// A ContactPoint gives its value as the code, no system (ContactPoint.system is not a
    /// code system), and its `use` as text.
    Token {
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
    },
    /// A reference: `reference` as written (`Patient/1`, an absolute URL, `urn:uuid:…`,
    /// `#contained`, or the URL of a canonical/uri element), with the type, id and version
    /// when it is a literal FHIR reference
    /// ([`parse_literal_reference`](fhirpath::parse_literal_reference)), and
    /// Reference.identifier as `(system, value)` for the `:identifier` modifier.
    Reference {
        reference: Option<String>,
        resource_type: Option<String>,
        id: Option<String>,
        version: Option<String>,
        identifier: Option<(Option<String>, String)>,
    },
    /// `[low, high)` in microseconds since the Unix epoch (UTC); `i64::MIN` / `i64::MAX` for
    /// an open end of a Period.
    Date {
        low: i64,
        high: i64,
    },
    /// Quantity and its kinds (Age, Duration, Distance, Count, SimpleQuantity), Money (the
    /// currency as `code` in system `urn:iso:std:iso:4217`) and Range. `[low, high)` is the
    /// precision range of the value; a comparator (`<5`) opens the side it points to; a Range
    /// spans its low's low to its high's high, with `value` its low (or high) value.
    Quantity {
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    /// A number with its precision range `[low, high)`.
    Number {
        value: f64,
        low: f64,
        high: f64,
    },
    Uri(String),
}

/// The values of one search parameter on one resource: the expression's nodes, each converted
/// by its FHIR type for a parameter of `search_type`. Elements that have no value of that type
/// (a malformed date, a Quantity without a value) are skipped.
pub fn extract(
    expression: &Expression,
    search_type: SearchType,
    resource: &Value,
) -> Vec<SearchValue> {
    let mut values = Vec::new();
    for node in expression.evaluate(resource) {
        push_node_values(&node, search_type, &mut values);
    }
    values
}

/// The values of one node for a parameter of `search_type`; what [`extract`] does per node,
/// exposed for the components of composite parameters.
pub fn node_values(node: &Node<'_>, search_type: SearchType) -> Vec<SearchValue> {
    let mut values = Vec::new();
    push_node_values(node, search_type, &mut values);
    values
}

fn push_node_values(node: &Node<'_>, search_type: SearchType, out: &mut Vec<SearchValue>) {
    match node.value {
        Value::Object(object) => {
            let shape = shape_of(node.type_hint, object);
            push_object_values(shape, object, search_type, out);
        }
        Value::String(text) => push_text_values(text, search_type, out),
        Value::Bool(value) => {
            if search_type == SearchType::Token {
                out.push(code_token(value.to_string()));
            }
        }
        Value::Number(number) => push_number_values(number, search_type, out),
        // The evaluator flattens arrays, and null is no value.
        Value::Array(_) | Value::Null => {}
    }
}

/// A primitive string, read as the parameter's type wants it.
fn push_text_values(text: &str, search_type: SearchType, out: &mut Vec<SearchValue>) {
    match search_type {
        SearchType::String => out.push(SearchValue::String(text.to_owned())),
        SearchType::Token => out.push(code_token(text.to_owned())),
        // canonical and uri elements under a reference parameter: matched by their URL.
        SearchType::Reference => out.push(SearchValue::Reference {
            reference: Some(text.to_owned()),
            resource_type: None,
            id: None,
            version: None,
            identifier: None,
        }),
        SearchType::Date => {
            if let Some((low, high)) = parse_date_range(text) {
                out.push(SearchValue::Date { low, high });
            }
        }
        SearchType::Uri => out.push(SearchValue::Uri(text.to_owned())),
        SearchType::Number | SearchType::Quantity | SearchType::Composite | SearchType::Special => {
        }
    }
}

fn push_number_values(number: &Number, search_type: SearchType, out: &mut Vec<SearchValue>) {
    let text = number.to_string();
    match search_type {
        SearchType::Number => {
            if let Some((value, low, high)) = parse_decimal_range(&text) {
                out.push(SearchValue::Number { value, low, high });
            }
        }
        SearchType::Quantity => {
            if let Some((value, low, high)) = parse_decimal_range(&text) {
                out.push(SearchValue::Quantity {
                    value,
                    low,
                    high,
                    system: None,
                    code: None,
                    unit: None,
                });
            }
        }
        SearchType::Token => out.push(code_token(text)),
        _ => {}
    }
}

fn code_token(code: String) -> SearchValue {
    SearchValue::Token {
        system: None,
        code: Some(code),
        text: None,
    }
}

/// The FHIR data types that have a search reading, as far as conversion cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Resource,
    CodeableConcept,
    Coding,
    Identifier,
    ContactPoint,
    Reference,
    HumanName,
    Address,
    Period,
    Timing,
    Quantity,
    Money,
    Range,
    Other,
}

fn shape_of(type_hint: Option<&str>, object: &Map<String, Value>) -> Shape {
    if object.get("resourceType").is_some_and(Value::is_string) {
        return Shape::Resource;
    }
    match type_hint {
        None => infer_shape(object),
        Some("CodeableConcept") => Shape::CodeableConcept,
        Some("Coding") => Shape::Coding,
        Some("Identifier") => Shape::Identifier,
        Some("ContactPoint") => Shape::ContactPoint,
        Some("Reference") => Shape::Reference,
        Some("HumanName") => Shape::HumanName,
        Some("Address") => Shape::Address,
        Some("Period") => Shape::Period,
        Some("Timing") => Shape::Timing,
        Some(
            "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity"
            | "MoneyQuantity",
        ) => Shape::Quantity,
        Some("Money") => Shape::Money,
        Some("Range") => Shape::Range,
        // A known type without a search reading (Ratio, SampledData, Attachment, ...):
        // guessing from its shape could only misread it.
        Some(_) => Shape::Other,
    }
}

/// The type of an element the evaluator could not type, from the members only that type has.
/// Order matters where types share members: Money and Quantity both have a numeric `value`,
/// Identifier and ContactPoint both a string one.
fn infer_shape(object: &Map<String, Value>) -> Shape {
    let has = |key: &str| object.contains_key(key);
    let has_any = |keys: &[&str]| keys.iter().any(|key| object.contains_key(*key));
    if object.get("coding").is_some_and(Value::is_array) {
        Shape::CodeableConcept
    } else if has("reference") {
        Shape::Reference
    } else if has_any(&["family", "given", "prefix", "suffix"]) {
        Shape::HumanName
    } else if has_any(&["line", "city", "district", "state", "postalCode", "country"]) {
        Shape::Address
    } else if has("currency") {
        Shape::Money
    } else if object.get("value").is_some_and(Value::is_number) {
        Shape::Quantity
    } else if has_any(&["low", "high"]) {
        Shape::Range
    } else if has_any(&["start", "end"]) {
        Shape::Period
    } else if has_any(&["event", "repeat"]) {
        Shape::Timing
    } else if object.get("value").is_some_and(Value::is_string) {
        let system = object.get("system").and_then(Value::as_str);
        if system.is_some_and(|system| CONTACT_POINT_SYSTEMS.contains(&system)) {
            Shape::ContactPoint
        } else {
            Shape::Identifier
        }
    } else if has_any(&["system", "code"]) {
        Shape::Coding
    } else if object.get("identifier").is_some_and(Value::is_object) {
        Shape::Reference
    } else if has("text")
        && object
            .keys()
            .all(|key| matches!(key.as_str(), "text" | "id" | "extension"))
    {
        // A CodeableConcept known only by its text.
        Shape::CodeableConcept
    } else {
        Shape::Other
    }
}

fn push_object_values(
    shape: Shape,
    object: &Map<String, Value>,
    search_type: SearchType,
    out: &mut Vec<SearchValue>,
) {
    match (search_type, shape) {
        (SearchType::String, Shape::HumanName) => {
            for part in ["family", "given", "prefix", "suffix", "text"] {
                push_strings(object.get(part), out);
            }
        }
        (SearchType::String, Shape::Address) => {
            for part in [
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
                "text",
            ] {
                push_strings(object.get(part), out);
            }
        }
        (SearchType::String, Shape::CodeableConcept) => {
            push_strings(object.get("text"), out);
            for coding in objects(object.get("coding")) {
                push_strings(coding.get("display"), out);
            }
        }
        (SearchType::String, Shape::Coding) => push_strings(object.get("display"), out),
        // A name or address known only by its text (`{"use": "usual", "text": "..."}`), whose
        // shape fits both, or an Annotation: the text is what there is to search.
        (SearchType::String, Shape::Other) => push_strings(object.get("text"), out),
        (SearchType::Token, Shape::CodeableConcept) => {
            for coding in objects(object.get("coding")) {
                push_coding_token(coding, out);
            }
            if let Some(text) = text_of(object, "text") {
                out.push(SearchValue::Token {
                    system: None,
                    code: None,
                    text: Some(text),
                });
            }
        }
        (SearchType::Token, Shape::Coding) => push_coding_token(object, out),
        (SearchType::Token, Shape::Identifier) => {
            let system = text_of(object, "system");
            let code = text_of(object, "value");
            if system.is_some() || code.is_some() {
                let text = object
                    .get("type")
                    .and_then(Value::as_object)
                    .and_then(|identifier_type| text_of(identifier_type, "text"));
                out.push(SearchValue::Token { system, code, text });
            }
        }
        (SearchType::Token, Shape::ContactPoint) => {
            if let Some(value) = text_of(object, "value") {
                out.push(SearchValue::Token {
                    system: None,
                    code: Some(value),
                    text: text_of(object, "use"),
                });
            }
        }
        (SearchType::Reference, Shape::Reference) => push_reference(object, out),
        (SearchType::Reference, Shape::Resource) => push_resource_reference(object, out),
        (SearchType::Date, Shape::Period) => {
            if let Some((low, high)) = period_range(object) {
                out.push(SearchValue::Date { low, high });
            }
        }
        (SearchType::Date, Shape::Timing) => {
            if let Some((low, high)) = timing_range(object) {
                out.push(SearchValue::Date { low, high });
            }
        }
        (SearchType::Quantity, Shape::Quantity) => out.extend(quantity(object)),
        (SearchType::Quantity, Shape::Money) => out.extend(money(object)),
        (SearchType::Quantity, Shape::Range) => out.extend(range_quantity(object)),
        (SearchType::Number, Shape::Quantity | Shape::Money) => {
            if let Some((value, low, high)) = decimal_member(object, "value") {
                out.push(SearchValue::Number { value, low, high });
            }
        }
        _ => {}
    }
}

fn text_of(object: &Map<String, Value>, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A string member, or each string of an array member.
fn push_strings(value: Option<&Value>, out: &mut Vec<SearchValue>) {
    match value {
        Some(Value::String(text)) => out.push(SearchValue::String(text.clone())),
        Some(Value::Array(entries)) => out.extend(
            entries
                .iter()
                .filter_map(Value::as_str)
                .map(|text| SearchValue::String(text.to_owned())),
        ),
        _ => {}
    }
}

/// The objects of an array member (or the member itself if it is a lone object).
fn objects(value: Option<&Value>) -> impl Iterator<Item = &Map<String, Value>> {
    let entries: &[Value] = match value {
        Some(Value::Array(entries)) => entries,
        Some(single @ Value::Object(_)) => std::slice::from_ref(single),
        _ => &[],
    };
    entries.iter().filter_map(Value::as_object)
}

fn push_coding_token(coding: &Map<String, Value>, out: &mut Vec<SearchValue>) {
    let system = text_of(coding, "system");
    let code = text_of(coding, "code");
    let text = text_of(coding, "display");
    if system.is_some() || code.is_some() || text.is_some() {
        out.push(SearchValue::Token { system, code, text });
    }
}

fn push_reference(object: &Map<String, Value>, out: &mut Vec<SearchValue>) {
    let reference = text_of(object, "reference");
    let identifier = object
        .get("identifier")
        .and_then(Value::as_object)
        .and_then(|identifier| {
            let value = text_of(identifier, "value")?;
            Some((text_of(identifier, "system"), value))
        });
    if reference.is_none() && identifier.is_none() {
        // A display-only reference points at nothing searchable.
        return;
    }
    let parsed = reference
        .as_deref()
        .and_then(fhirpath::parse_literal_reference);
    out.push(SearchValue::Reference {
        resource_type: parsed.map(|p| p.resource_type.to_owned()),
        id: parsed.map(|p| p.id.to_owned()),
        version: parsed.and_then(|p| p.version).map(str::to_owned),
        reference,
        identifier,
    });
}

/// A whole resource where a reference is expected (`Bundle.entry[0].resource` for a document's
/// Composition): it refers to itself by type and id.
fn push_resource_reference(object: &Map<String, Value>, out: &mut Vec<SearchValue>) {
    let (Some(resource_type), Some(id)) = (text_of(object, "resourceType"), text_of(object, "id"))
    else {
        return;
    };
    let version = object
        .get("meta")
        .and_then(Value::as_object)
        .and_then(|meta| text_of(meta, "versionId"));
    out.push(SearchValue::Reference {
        reference: Some(format!("{resource_type}/{id}")),
        resource_type: Some(resource_type),
        id: Some(id),
        version,
        identifier: None,
    });
}

/// A Period's range; an absent end is open. `None` when both ends are absent or one is not a
/// date, so that a broken Period is skipped rather than matching everything.
fn period_range(period: &Map<String, Value>) -> Option<(i64, i64)> {
    let start = period.get("start");
    let end = period.get("end");
    if start.is_none() && end.is_none() {
        return None;
    }
    let low = match start {
        None => i64::MIN,
        Some(start) => parse_date_range(start.as_str()?)?.0,
    };
    let high = match end {
        None => i64::MAX,
        Some(end) => parse_date_range(end.as_str()?)?.1,
    };
    Some((low, high))
}

/// A Timing's outer limits: from its earliest event or bounds to its latest. The spec says
/// only the outer limits matter ("every second day between 31-Jan and 24-Mar includes
/// 1-Feb"). Unparseable events are skipped.
fn timing_range(timing: &Map<String, Value>) -> Option<(i64, i64)> {
    let events = match timing.get("event") {
        Some(Value::Array(events)) => events.as_slice(),
        _ => &[],
    };
    let bounds = timing
        .get("repeat")
        .and_then(|repeat| repeat.get("boundsPeriod"))
        .and_then(Value::as_object)
        .and_then(period_range);
    events
        .iter()
        .filter_map(Value::as_str)
        .filter_map(parse_date_range)
        .chain(bounds)
        .reduce(|(low_a, high_a), (low_b, high_b)| (low_a.min(low_b), high_a.max(high_b)))
}

/// The precision range of a numeric member.
fn decimal_member(object: &Map<String, Value>, key: &str) -> Option<(f64, f64, f64)> {
    match object.get(key)? {
        Value::Number(number) => parse_decimal_range(&number.to_string()),
        _ => None,
    }
}

/// A Quantity's fields, before it becomes a [`SearchValue::Quantity`].
struct QuantityParts {
    value: f64,
    low: f64,
    high: f64,
    system: Option<String>,
    code: Option<String>,
    unit: Option<String>,
}

impl QuantityParts {
    fn into_value(self) -> SearchValue {
        SearchValue::Quantity {
            value: self.value,
            low: self.low,
            high: self.high,
            system: self.system,
            code: self.code,
            unit: self.unit,
        }
    }
}

/// A Quantity (or Age, Duration, ...); `None` without a numeric value.
fn quantity_parts(object: &Map<String, Value>) -> Option<QuantityParts> {
    let (value, mut low, mut high) = decimal_member(object, "value")?;
    match object.get("comparator").and_then(Value::as_str) {
        Some("<" | "<=") => low = f64::NEG_INFINITY,
        Some(">" | ">=") => high = f64::INFINITY,
        _ => {}
    }
    Some(QuantityParts {
        value,
        low,
        high,
        system: text_of(object, "system"),
        code: text_of(object, "code"),
        unit: text_of(object, "unit"),
    })
}

fn quantity(object: &Map<String, Value>) -> Option<SearchValue> {
    quantity_parts(object).map(QuantityParts::into_value)
}

fn money(object: &Map<String, Value>) -> Option<SearchValue> {
    let (value, low, high) = decimal_member(object, "value")?;
    let currency = text_of(object, "currency");
    Some(SearchValue::Quantity {
        value,
        low,
        high,
        system: currency.as_ref().map(|_| CURRENCY_SYSTEM.to_owned()),
        code: currency,
        unit: None,
    })
}

/// A Range as one quantity spanning from its low end's low to its high end's high; an absent
/// end is open. Value, system, code and unit come from the low end, else the high end.
fn range_quantity(object: &Map<String, Value>) -> Option<SearchValue> {
    let end = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_object)
            .and_then(quantity_parts)
    };
    let (low_end, high_end) = (end("low"), end("high"));
    let low = low_end.as_ref().map_or(f64::NEG_INFINITY, |end| end.low);
    let high = high_end.as_ref().map_or(f64::INFINITY, |end| end.high);
    let described_by = low_end.or(high_end)?;
    Some(
        QuantityParts {
            low,
            high,
            ..described_by
        }
        .into_value(),
    )
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

const MICROS_PER_SECOND: i64 = 1_000_000;

/// Parses a FHIR date, dateTime or instant, or a date search value after its prefix, into the
/// range its precision implies, as `[low, high)` microseconds since the epoch (UTC): `2013`,
/// `2013-01`, `2013-01-14`, `2013-01-14T10:00`, `2013-01-14T10:00:00Z`,
/// `2013-01-14T10:00:00.123+02:00`. Without a time zone the time is taken as UTC. A fraction
/// finer than microseconds is truncated. `None` when malformed or not a real date.
pub fn parse_date_range(text: &str) -> Option<(i64, i64)> {
    let mut cursor = Cursor {
        bytes: text.as_bytes(),
        position: 0,
    };
    let year = cursor.digits(4)?;
    if cursor.at_end() {
        return Some((date_micros(year, 1, 1)?, date_micros(year + 1, 1, 1)?));
    }
    cursor.require(b'-')?;
    let month = cursor.digits(2)?;
    if cursor.at_end() {
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Some((
            date_micros(year, month, 1)?,
            date_micros(next_year, next_month, 1)?,
        ));
    }
    cursor.require(b'-')?;
    let day = cursor.digits(2)?;
    let day_start = date_micros(year, month, day)?;
    if cursor.at_end() {
        return Some((day_start, day_start + 86_400 * MICROS_PER_SECOND));
    }
    cursor.require(b'T')?;
    let hour = cursor.digits(2)?;
    cursor.require(b':')?;
    let minute = cursor.digits(2)?;
    let mut seconds = 0;
    let mut fraction_micros = 0;
    // Minute precision when the seconds are left out (allowed in search values).
    let mut width = 60 * MICROS_PER_SECOND;
    if cursor.eat(b':') {
        // 60 is a leap second, which FHIR's regex allows; it simply runs into the next minute.
        seconds = cursor.digits(2).filter(|s| *s <= 60)?;
        width = MICROS_PER_SECOND;
        if cursor.eat(b'.') {
            let digits = cursor.digit_run();
            if digits.is_empty() {
                return None;
            }
            let kept = &digits[..digits.len().min(6)];
            let mut micros: i64 = 0;
            for digit in kept {
                micros = micros * 10 + i64::from(digit - b'0');
            }
            let scale = 10_i64.pow(6 - kept.len() as u32);
            fraction_micros = micros * scale;
            width = scale;
        }
    }
    let offset_seconds = if cursor.eat(b'Z') {
        0
    } else if let Some(sign) = cursor.sign() {
        let offset_hours = cursor.digits(2).filter(|h| *h <= 14)?;
        cursor.require(b':')?;
        let offset_minutes = cursor.digits(2).filter(|m| *m <= 59)?;
        sign * (offset_hours * 3600 + offset_minutes * 60)
    } else {
        0
    };
    if !cursor.at_end() || hour > 23 || minute > 59 {
        return None;
    }
    let seconds_of_day = hour * 3600 + minute * 60 + seconds - offset_seconds;
    let low = day_start + seconds_of_day * MICROS_PER_SECOND + fraction_micros;
    Some((low, low + width))
}

/// Midnight UTC of a calendar date, in microseconds since the epoch; `None` for a date that
/// does not exist (`2013-02-30`).
fn date_micros(year: i64, month: i64, day: i64) -> Option<i64> {
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(year).ok()?,
        u32::try_from(month).ok()?,
        u32::try_from(day).ok()?,
    )?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros())
}

/// Reads the fixed-width fields of a date.
struct Cursor<'t> {
    bytes: &'t [u8],
    position: usize,
}

impl<'t> Cursor<'t> {
    fn at_end(&self) -> bool {
        self.position >= self.bytes.len()
    }

    fn eat(&mut self, expected: u8) -> bool {
        if self.bytes.get(self.position) == Some(&expected) {
            self.position += 1;
            true
        } else {
            false
        }
    }

    fn require(&mut self, expected: u8) -> Option<()> {
        self.eat(expected).then_some(())
    }

    fn sign(&mut self) -> Option<i64> {
        if self.eat(b'+') {
            Some(1)
        } else if self.eat(b'-') {
            Some(-1)
        } else {
            None
        }
    }

    /// Exactly `count` ASCII digits.
    fn digits(&mut self, count: usize) -> Option<i64> {
        let field = self.bytes.get(self.position..self.position + count)?;
        let mut value = 0;
        for byte in field {
            if !byte.is_ascii_digit() {
                return None;
            }
            value = value * 10 + i64::from(byte - b'0');
        }
        self.position += count;
        Some(value)
    }

    /// All the digits from here, possibly none.
    fn digit_run(&mut self) -> &'t [u8] {
        let rest = self.bytes.get(self.position..).unwrap_or(&[]);
        let length = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        self.position += length;
        &rest[..length]
    }
}

// ---------------------------------------------------------------------------------------------
// Decimals
// ---------------------------------------------------------------------------------------------

/// Parses a decimal (`100`, `-5.40`, `1e2`, `1.5E-3`) into `(value, low, high)`, where
/// `[low, high)` is the range its written precision implies: half a unit of the last digit
/// either side. `100` → `[99.5, 100.5)`, `5.40` → `[5.395, 5.405)`, `1e2` → `[50, 150)`.
/// (The R4 spec's own table gives `[95, 105)` for `1e2`, which is two significant figures
/// and contradicts its "1 significant figure"; the rule here follows the figures.)
/// The bounds are computed from the decimal text, so they are the closest doubles to the exact
/// bounds. `None` when malformed or out of range.
pub fn parse_decimal_range(text: &str) -> Option<(f64, f64, f64)> {
    let unsigned = text
        .strip_prefix('-')
        .or_else(|| text.strip_prefix('+'))
        .unwrap_or(text);
    let negative = text.starts_with('-');
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], parse_exponent(&unsigned[at + 1..])?),
        None => (unsigned, 0),
    };
    let (integer_digits, fraction_digits) = match mantissa.split_once('.') {
        Some((integer, fraction)) => (integer, fraction),
        None => (mantissa, ""),
    };
    let all_digits = |digits: &str| digits.bytes().all(|b| b.is_ascii_digit());
    if integer_digits.is_empty()
        || !all_digits(integer_digits)
        || (mantissa.contains('.') && fraction_digits.is_empty())
        || !all_digits(fraction_digits)
    {
        return None;
    }
    let value: f64 = text.parse().ok().filter(|v: &f64| v.is_finite())?;
    // The value is (all digits as one integer) × 10^scale; half a unit of the last digit is
    // 5 × 10^(scale − 1).
    let scale = exponent - i32::try_from(fraction_digits.len()).ok()?;
    let significant = format!("{integer_digits}{fraction_digits}");
    let significant = significant.trim_start_matches('0');
    let (low, high) = match significant.parse::<i128>() {
        Ok(digits) if significant.len() <= 30 => {
            let signed = if negative { -digits } else { digits };
            let bound = |offset: i128| format!("{}e{}", signed * 10 + offset, scale - 1).parse();
            (bound(-5).ok()?, bound(5).ok()?)
        }
        // All zeros, which trim to nothing.
        _ if significant.is_empty() => {
            let half = 5.0 * 10_f64.powi(scale - 1);
            (-half, half)
        }
        // Too many digits for exact arithmetic; the float bounds are as good as the value.
        _ => {
            let half = 5.0 * 10_f64.powi(scale - 1);
            (value - half, value + half)
        }
    };
    (low.is_finite() && high.is_finite()).then_some((value, low, high))
}

/// An exponent: optional sign and at most four digits (beyond that no double is finite anyway).
fn parse_exponent(text: &str) -> Option<i32> {
    let digits = text
        .strip_prefix('-')
        .or_else(|| text.strip_prefix('+'))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------------------------

/// Normalises a string for string search (which ignores case and accents): lowercase, accents
/// removed, whitespace runs collapsed to one space, trimmed; punctuation kept.
///
/// Accents are removed as Unicode NFD followed by dropping combining marks would, for the
/// Latin-1 Supplement and Latin Extended-A letters (a table here rather than a normalisation
/// crate); combining marks already present are dropped too. Letters with a stroke (ø, đ, ł,
/// ħ, ŧ), which NFD does not decompose, are folded as well, because people searching type them
/// without it. Ligatures and other letters (æ, œ, ß, þ, ð, ı) are kept.
pub fn normalize_string(text: &str) -> String {
    let mut normalized = String::with_capacity(text.len());
    let mut pending_space = false;
    for character in text.chars().flat_map(char::to_lowercase) {
        if character.is_whitespace() {
            pending_space = !normalized.is_empty();
        } else if !is_combining_mark(character) {
            if pending_space {
                normalized.push(' ');
                pending_space = false;
            }
            normalized.push(without_diacritic(character));
        }
    }
    normalized
}

fn is_combining_mark(character: char) -> bool {
    matches!(
        character,
        '\u{0300}'..='\u{036F}'
            | '\u{1AB0}'..='\u{1AFF}'
            | '\u{1DC0}'..='\u{1DFF}'
            | '\u{20D0}'..='\u{20FF}'
            | '\u{FE20}'..='\u{FE2F}'
    )
}

/// The base letter of a lowercase accented Latin letter (Latin-1 Supplement and Latin
/// Extended-A); any other character unchanged.
fn without_diacritic(character: char) -> char {
    match character {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
        'ď' | 'đ' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
        'ĥ' | 'ħ' => 'h',
        'ì' | 'í' | 'î' | 'ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' => 'i',
        'ĵ' => 'j',
        'ķ' => 'k',
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => 'l',
        'ñ' | 'ń' | 'ņ' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
        'ŕ' | 'ŗ' | 'ř' => 'r',
        'ś' | 'ŝ' | 'ş' | 'š' => 's',
        'ţ' | 'ť' | 'ŧ' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
        'ŵ' => 'w',
        'ý' | 'ÿ' | 'ŷ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Microseconds since the epoch of a UTC date and time, for expected values.
    fn micros(text: &str) -> i64 {
        match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(instant) => instant.timestamp_micros(),
            Err(error) => panic!("{text}: {error}"),
        }
    }

    fn expression(text: &str) -> Expression {
        Expression::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn values_of(text: &str, search_type: SearchType, resource: &Value) -> Vec<SearchValue> {
        extract(&expression(text), search_type, resource)
    }

    fn string(text: &str) -> SearchValue {
        SearchValue::String(text.to_owned())
    }

    fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> SearchValue {
        SearchValue::Token {
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
            text: text.map(str::to_owned),
        }
    }

    fn reference(
        reference: &str,
        parsed: Option<(&str, &str, Option<&str>)>,
        identifier: Option<(Option<&str>, &str)>,
    ) -> SearchValue {
        SearchValue::Reference {
            reference: (!reference.is_empty()).then(|| reference.to_owned()),
            resource_type: parsed.map(|(t, _, _)| t.to_owned()),
            id: parsed.map(|(_, id, _)| id.to_owned()),
            version: parsed.and_then(|(_, _, v)| v).map(str::to_owned),
            identifier: identifier.map(|(s, v)| (s.map(str::to_owned), v.to_owned())),
        }
    }

    fn day(date: &str) -> SearchValue {
        let low = micros(&format!("{date}T00:00:00Z"));
        SearchValue::Date {
            low,
            high: low + 86_400_000_000,
        }
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= 1e-12 * expected.abs().max(1.0),
            "{actual} != {expected}"
        );
    }

    #[test]
    fn search_type_codes() {
        for code in [
            "number",
            "date",
            "string",
            "token",
            "reference",
            "composite",
            "quantity",
            "uri",
            "special",
        ] {
            let parsed = SearchType::parse(code);
            assert_eq!(parsed.map(SearchType::as_str), Some(code));
        }
        assert_eq!(SearchType::parse("Token"), None);
        assert_eq!(SearchType::parse(""), None);
    }

    #[test]
    fn human_name_and_address_parts_are_strings() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{"text": "Dr Jo Smith Jr", "family": "Smith", "given": ["Jo", null],
                      "prefix": ["Dr"], "suffix": ["Jr"]}],
            "address": [{"line": ["1 Main St", "Flat 2"], "city": "Town", "district": "D",
                         "state": "S", "postalCode": "123", "country": "NZ", "text": "all"}]
        });
        assert_eq!(
            values_of("Patient.name", SearchType::String, &patient),
            ["Smith", "Jo", "Dr", "Jr", "Dr Jo Smith Jr"].map(string)
        );
        assert_eq!(
            values_of("Patient.address", SearchType::String, &patient),
            ["1 Main St", "Flat 2", "Town", "D", "S", "123", "NZ", "all"].map(string)
        );
        // A name has no token reading.
        assert!(values_of("Patient.name", SearchType::Token, &patient).is_empty());
        let text_only =
            json!({"resourceType": "Patient", "name": [{"use": "usual", "text": "张无忌"}]});
        assert_eq!(
            values_of("Patient.name", SearchType::String, &text_only),
            [string("张无忌")]
        );
    }

    #[test]
    fn codes_become_tokens() {
        let resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "1", "display": "One"},
                    {"code": "2"}
                ],
                "text": "Code text"
            },
            "category": [{"text": "Only text"}],
            "valueBoolean": true,
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:x",
                            "type": {"text": "Kind"}}],
            "focus": [{"display": "nothing to search"}]
        });
        assert_eq!(
            values_of("Observation.code", SearchType::Token, &resource),
            [
                token(Some("http://loinc.org"), Some("1"), Some("One")),
                token(None, Some("2"), None),
                token(None, None, Some("Code text")),
            ]
        );
        assert_eq!(
            values_of("Observation.code.coding[0]", SearchType::Token, &resource),
            [token(Some("http://loinc.org"), Some("1"), Some("One"))]
        );
        assert_eq!(
            values_of("Observation.category", SearchType::Token, &resource),
            [token(None, None, Some("Only text"))]
        );
        assert_eq!(
            values_of("Observation.status", SearchType::Token, &resource),
            [token(None, Some("final"), None)]
        );
        assert_eq!(
            values_of("Observation.value", SearchType::Token, &resource),
            [token(None, Some("true"), None)]
        );
        assert_eq!(
            values_of("Observation.identifier", SearchType::Token, &resource),
            [token(
                Some("urn:ietf:rfc:3986"),
                Some("urn:x"),
                Some("Kind")
            )]
        );
        assert!(values_of("Observation.focus", SearchType::Token, &resource).is_empty());
        assert_eq!(
            values_of("Observation.code", SearchType::String, &resource),
            ["Code text", "One"].map(string)
        );
    }

    #[test]
    fn references() {
        let resource = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/example"},
            "performer": [
                {"reference": "https://example.org/fhir/Practitioner/p-1/_history/7"},
                {"reference": "urn:uuid:04121321-4af5-424c-a0e1-ed3aab1c349d"},
                {"reference": "#contained"},
                {"identifier": {"system": "urn:oid:1.2", "value": "X9"}, "type": "Practitioner"},
                {"reference": "Organization/o1", "identifier": {"value": "Y"}},
                {"display": "Display only"}
            ],
            "hasMember": [{"reference": "not a reference"}],
            "instantiatesCanonical": "http://example.org/fhir/PlanDefinition/pd|2"
        });
        assert_eq!(
            values_of("Observation.subject", SearchType::Reference, &resource),
            [reference(
                "Patient/example",
                Some(("Patient", "example", None)),
                None
            )]
        );
        assert_eq!(
            values_of("Observation.performer", SearchType::Reference, &resource),
            [
                reference(
                    "https://example.org/fhir/Practitioner/p-1/_history/7",
                    Some(("Practitioner", "p-1", Some("7"))),
                    None
                ),
                reference("urn:uuid:04121321-4af5-424c-a0e1-ed3aab1c349d", None, None),
                reference("#contained", None, None),
                reference("", None, Some((Some("urn:oid:1.2"), "X9"))),
                reference(
                    "Organization/o1",
                    Some(("Organization", "o1", None)),
                    Some((None, "Y"))
                ),
            ]
        );
        assert_eq!(
            values_of("Observation.hasMember", SearchType::Reference, &resource),
            [reference("not a reference", None, None)]
        );
        assert_eq!(
            values_of(
                "Observation.instantiatesCanonical",
                SearchType::Reference,
                &resource
            ),
            [reference(
                "http://example.org/fhir/PlanDefinition/pd|2",
                None,
                None
            )]
        );
        let bundle = json!({
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Composition", "id": "c1",
                                    "meta": {"versionId": "3"}}}]
        });
        assert_eq!(
            values_of("Bundle.entry[0].resource", SearchType::Reference, &bundle),
            [reference(
                "Composition/c1",
                Some(("Composition", "c1", Some("3"))),
                None
            )]
        );
    }

    #[test]
    fn contact_points_are_matched_on_value_alone() {
        let patient = json!({
            "resourceType": "Patient",
            "telecom": [
                {"system": "phone", "value": "555-1234", "use": "home"},
                {"system": "email", "value": "a@example.org"},
                {"use": "home"}
            ]
        });
        assert_eq!(
            values_of("Patient.telecom", SearchType::Token, &patient),
            [
                token(None, Some("555-1234"), Some("home")),
                token(None, Some("a@example.org"), None)
            ]
        );
        assert_eq!(
            values_of(
                "Patient.telecom.where(system='email')",
                SearchType::Token,
                &patient
            ),
            [token(None, Some("a@example.org"), None)]
        );
    }

    #[test]
    fn dates_periods_and_timings() {
        let resource = json!({
            "resourceType": "MedicationRequest",
            "authoredOn": "2015-01-15T10:20:30.5-05:00",
            "note": [{"time": "not a date"}],
            "dosageInstruction": [
                {"timing": {"event": ["2015-02-01", "2015-01-10T08:00:00Z"]}},
                {"timing": {"event": ["2015-03-01"],
                            "repeat": {"boundsPeriod": {"start": "2014-12", "end": "2015"}}}},
                {"timing": {"code": {"text": "BID"}}}
            ],
            "dispenseRequest": {"validityPeriod": {"start": "2015-01-15"}},
            "substitution": {"period": {"end": "2015-01-15T10:00:00Z"}},
            "priorPrescription": {"start": "garbage"}
        });
        let authored = micros("2015-01-15T15:20:30.5Z");
        assert_eq!(
            values_of("MedicationRequest.authoredOn", SearchType::Date, &resource),
            [SearchValue::Date {
                low: authored,
                high: authored + 100_000
            }]
        );
        assert!(values_of("MedicationRequest.note.time", SearchType::Date, &resource).is_empty());
        assert_eq!(
            values_of(
                "MedicationRequest.dosageInstruction.timing",
                SearchType::Date,
                &resource
            ),
            [
                SearchValue::Date {
                    low: micros("2015-01-10T08:00:00Z"),
                    high: micros("2015-02-02T00:00:00Z")
                },
                SearchValue::Date {
                    low: micros("2014-12-01T00:00:00Z"),
                    high: micros("2016-01-01T00:00:00Z")
                }
            ]
        );
        assert_eq!(
            values_of(
                "MedicationRequest.dispenseRequest.validityPeriod",
                SearchType::Date,
                &resource
            ),
            [SearchValue::Date {
                low: micros("2015-01-15T00:00:00Z"),
                high: i64::MAX
            }]
        );
        assert_eq!(
            values_of(
                "MedicationRequest.substitution.period",
                SearchType::Date,
                &resource
            ),
            [SearchValue::Date {
                low: i64::MIN,
                high: micros("2015-01-15T10:00:01Z")
            }]
        );
        assert!(values_of(
            "MedicationRequest.priorPrescription",
            SearchType::Date,
            &resource
        )
        .is_empty());
    }

    #[test]
    fn quantities_money_and_ranges() {
        // Parsed from text: json!() would turn 5.40 into the f64 5.4 and lose the zero.
        let with_trailing_zero: Value = serde_json::from_str(
            r#"{"value": 5.40, "unit": "mmol/l", "system": "http://unitsofmeasure.org",
                "code": "mmol/L"}"#,
        )
        .unwrap_or_default();
        let resource = json!({
            "resourceType": "Observation",
            "valueQuantity": with_trailing_zero,
            "component": [
                {"valueQuantity": {"value": 5, "comparator": "<"}},
                {"valueRange": {"low": {"value": 1.5, "unit": "g"}, "high": {"value": 3}}},
                {"valueRange": {"high": {"value": 3, "code": "g"}}},
                {"valueRange": {}},
                {"valueQuantity": {"unit": "g"}},
                {"valueRatio": {"numerator": {"value": 1}}}
            ],
            "extension": [{"url": "x", "valueMoney": {"value": 40.5, "currency": "EUR"}}]
        });
        let quantity = values_of("Observation.value", SearchType::Quantity, &resource);
        let [SearchValue::Quantity {
            value,
            low,
            high,
            system,
            code,
            unit,
        }] = quantity.as_slice()
        else {
            panic!("{quantity:?}");
        };
        assert_close(*value, 5.4);
        // serde_json's arbitrary_precision keeps "5.40", so the precision is two decimals.
        assert_close(*low, 5.395);
        assert_close(*high, 5.405);
        assert_eq!(system.as_deref(), Some("http://unitsofmeasure.org"));
        assert_eq!(code.as_deref(), Some("mmol/L"));
        assert_eq!(unit.as_deref(), Some("mmol/l"));

        let components = values_of(
            "Observation.component.value",
            SearchType::Quantity,
            &resource,
        );
        let ranges: Vec<(f64, f64, f64, Option<String>)> = components
            .iter()
            .map(|value| match value {
                SearchValue::Quantity {
                    value,
                    low,
                    high,
                    code,
                    unit,
                    ..
                } => (*value, *low, *high, code.clone().or(unit.clone())),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ranges,
            [
                (5.0, f64::NEG_INFINITY, 5.5, None),
                (1.5, 1.45, 3.5, Some("g".to_owned())),
                (3.0, f64::NEG_INFINITY, 3.5, Some("g".to_owned())),
            ]
        );

        assert_eq!(
            values_of(
                "Observation.extension.value",
                SearchType::Quantity,
                &resource
            ),
            [SearchValue::Quantity {
                value: 40.5,
                low: 40.45,
                high: 40.55,
                system: Some("urn:iso:std:iso:4217".to_owned()),
                code: Some("EUR".to_owned()),
                unit: None
            }]
        );
        assert_eq!(
            values_of("Observation.value", SearchType::Number, &resource).len(),
            1
        );
    }

    #[test]
    fn numbers_uris_and_types_without_values() {
        let resource = json!({
            "resourceType": "RiskAssessment",
            "prediction": [{"probabilityDecimal": 0.02}, {"probabilityRange": {"low": {"value": 1}}}],
            "basis": [{"reference": "http://example.org/fhir/Observation/1"}],
            "implicitRules": "http://example.org/rules"
        });
        assert_eq!(
            values_of(
                "RiskAssessment.prediction.probability",
                SearchType::Number,
                &resource
            ),
            [SearchValue::Number {
                value: 0.02,
                low: 0.015,
                high: 0.025
            }]
        );
        assert_eq!(
            values_of("RiskAssessment.implicitRules", SearchType::Uri, &resource),
            [SearchValue::Uri("http://example.org/rules".to_owned())]
        );
        for search_type in [SearchType::Composite, SearchType::Special] {
            assert!(values_of("RiskAssessment.basis", search_type, &resource).is_empty());
            assert!(values_of("RiskAssessment.implicitRules", search_type, &resource).is_empty());
        }
        assert!(values_of("RiskAssessment.basis", SearchType::Uri, &resource).is_empty());
    }

    #[test]
    fn composite_components_convert_node_by_node() {
        let observation = json!({
            "resourceType": "Observation",
            "component": [{"code": {"coding": [{"code": "8480-6"}]},
                           "valueQuantity": {"value": 120}}]
        });
        let components = expression("Observation.component").evaluate(&observation);
        let code = expression("code").evaluate_from(&observation, &components);
        let value = expression("value.as(Quantity)").evaluate_from(&observation, &components);
        assert_eq!(
            node_values(&code[0], SearchType::Token),
            [token(None, Some("8480-6"), None)]
        );
        assert!(matches!(
            node_values(&value[0], SearchType::Quantity).as_slice(),
            [SearchValue::Quantity { value, .. }] if *value == 120.0
        ));
    }

    #[test]
    fn date_ranges_at_every_precision() {
        let range = |text: &str| parse_date_range(text).unwrap_or_else(|| panic!("{text}"));
        assert_eq!(
            range("2013"),
            (
                micros("2013-01-01T00:00:00Z"),
                micros("2014-01-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2013-01"),
            (
                micros("2013-01-01T00:00:00Z"),
                micros("2013-02-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2013-12"),
            (
                micros("2013-12-01T00:00:00Z"),
                micros("2014-01-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2012-02-29"),
            (
                micros("2012-02-29T00:00:00Z"),
                micros("2012-03-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2013-01-14T10:00"),
            (
                micros("2013-01-14T10:00:00Z"),
                micros("2013-01-14T10:01:00Z")
            )
        );
        assert_eq!(
            range("2013-01-14T10:00+01:00"),
            (
                micros("2013-01-14T09:00:00Z"),
                micros("2013-01-14T09:01:00Z")
            )
        );
        assert_eq!(
            range("2013-01-14T10:00:00Z"),
            (
                micros("2013-01-14T10:00:00Z"),
                micros("2013-01-14T10:00:01Z")
            )
        );
        assert_eq!(
            range("2013-01-14T10:00:00"),
            (
                micros("2013-01-14T10:00:00Z"),
                micros("2013-01-14T10:00:01Z")
            )
        );
        let with_millis = micros("2013-01-14T08:00:00.123Z");
        assert_eq!(
            range("2013-01-14T10:00:00.123+02:00"),
            (with_millis, with_millis + 1_000)
        );
        let west = micros("2013-01-15T03:30:05Z");
        assert_eq!(range("2013-01-14T23:00:05-04:30"), (west, west + 1_000_000));
        let fine = micros("2013-01-14T10:00:00.123456Z");
        assert_eq!(range("2013-01-14T10:00:00.123456789Z"), (fine, fine + 1));
        // A leap second runs into the next minute.
        assert_eq!(
            range("2016-12-31T23:59:60Z").0,
            micros("2017-01-01T00:00:00Z")
        );
        assert_eq!(range("1970-01-01"), (0, 86_400_000_000));
        assert!(range("1900-01-01").0 < 0);
        for malformed in [
            "",
            "13",
            "abcd",
            "2013-1",
            "2013-13",
            "2013-00",
            "2013-02-30",
            "2013-01-14T",
            "2013-01-14T10",
            "2013-01-14T24:00",
            "2013-01-14T10:60",
            "2013-01-14T10:00:61",
            "2013-01-14T10:00:00.",
            "2013-01-14T10:00:00.Z",
            "2013-01-14T10:00:00+15:00",
            "2013-01-14T10:00:00+01",
            "2013-01-14Z",
            "2013-01-14 10:00",
            "2013-01-14T10:00:00Zjunk",
            "2013/01/14",
            "２０１３",
        ] {
            assert_eq!(parse_date_range(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn decimal_ranges_follow_written_precision() {
        let check = |text: &str, expected: (f64, f64, f64)| {
            let (value, low, high) = parse_decimal_range(text).unwrap_or_else(|| panic!("{text}"));
            assert_close(value, expected.0);
            assert_close(low, expected.1);
            assert_close(high, expected.2);
        };
        check("100", (100.0, 99.5, 100.5));
        check("100.00", (100.0, 99.995, 100.005));
        check("5.4", (5.4, 5.35, 5.45));
        check("5.40", (5.4, 5.395, 5.405));
        check("-5.4", (-5.4, -5.45, -5.35));
        check("+7", (7.0, 6.5, 7.5));
        check("0", (0.0, -0.5, 0.5));
        check("0.000", (0.0, -0.0005, 0.0005));
        check("1e2", (100.0, 50.0, 150.0));
        check("1.0e2", (100.0, 95.0, 105.0));
        check("1.5E-3", (0.0015, 0.00145, 0.00155));
        check("2e+3", (2000.0, 1500.0, 2500.0));
        check("007", (7.0, 6.5, 7.5));
        check(
            "123456789012345678901234567890123456789",
            (
                1.2345678901234568e38,
                1.2345678901234568e38,
                1.2345678901234568e38,
            ),
        );
        // The bounds are the doubles nearest the exact decimals, not float arithmetic's.
        assert_eq!(parse_decimal_range("5.4"), Some((5.4, 5.35, 5.45)));
        assert_eq!(parse_decimal_range("0.3"), Some((0.3, 0.25, 0.35)));
        for malformed in [
            "", "-", "+", ".5", "5.", "1e", "1e+", "e5", "abc", "1,5", " 5", "5 ", "NaN", "inf",
            "1e99999", "1e400", "--5", "0x10", "1.2.3",
        ] {
            assert_eq!(parse_decimal_range(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn strings_normalise_case_accents_and_spaces() {
        assert_eq!(normalize_string("Müller"), "muller");
        assert_eq!(normalize_string("  ÉLISE  Dubois "), "elise dubois");
        assert_eq!(normalize_string("Ångström\tÇa\n va"), "angstrom ca va");
        assert_eq!(
            normalize_string("Łódź Dvořák Ørsted Đorđe"),
            "lodz dvorak orsted dorde"
        );
        // Precomposed letters beyond Latin Extended-A are kept; decomposed ones lose marks.
        assert_eq!(normalize_string("Nguyễn"), "nguyễn");
        assert_eq!(normalize_string("Nguye\u{302}\u{303}n"), "nguyen");
        assert_eq!(normalize_string("e\u{301}te\u{301}"), "ete");
        assert_eq!(normalize_string("O'Brien-Smith, Jr."), "o'brien-smith, jr.");
        assert_eq!(normalize_string("ÆSIR Straße"), "æsir straße");
        assert_eq!(normalize_string("İstanbul"), "istanbul");
        assert_eq!(normalize_string("   "), "");
        assert_eq!(normalize_string("ŸVES"), "yves");
    }

    // ---- The official R4 definitions and examples -------------------------------------------

    use super::fhirpath::tests::{example_resources, examples_dir, read_json, search_parameters};

    #[test]
    fn every_r4_parameter_extracts_from_every_example() {
        let Some(dir) = examples_dir() else { return };
        let parameters: Vec<(SearchType, Expression)> = search_parameters(&dir)
            .into_iter()
            .filter_map(|(_, kind, text)| {
                Some((SearchType::parse(kind.as_str())?, expression(text.as_str())))
            })
            .collect();
        assert!(parameters.len() > 1300);
        let mut counts = std::collections::BTreeMap::new();
        for (name, resource) in example_resources(&dir) {
            for (search_type, parsed) in &parameters {
                for value in extract(parsed, *search_type, &resource) {
                    let kind = match &value {
                        SearchValue::Date { low, high } => {
                            assert!(low < high, "{name}: {value:?}");
                            "date"
                        }
                        SearchValue::Quantity {
                            value, low, high, ..
                        }
                        | SearchValue::Number { value, low, high } => {
                            assert!(low <= value && value <= high, "{name}: {value:?}");
                            "number or quantity"
                        }
                        SearchValue::String(_) => "string",
                        SearchValue::Token { .. } => "token",
                        SearchValue::Reference { .. } => "reference",
                        SearchValue::Uri(_) => "uri",
                    };
                    *counts.entry(kind).or_insert(0) += 1;
                }
            }
        }
        for kind in [
            "date",
            "number or quantity",
            "string",
            "token",
            "reference",
            "uri",
        ] {
            assert!(counts.get(kind).is_some_and(|n| *n > 10), "{counts:?}");
        }
    }

    #[test]
    fn patient_example_values() {
        let Some(dir) = examples_dir() else { return };
        let patient = read_json(&dir.join("Patient-example.json"));
        assert_eq!(
            values_of("Patient.name", SearchType::String, &patient),
            ["Chalmers", "Peter", "James", "Jim", "Windsor", "Peter", "James"].map(string)
        );
        assert_eq!(
            values_of("Patient.address", SearchType::String, &patient),
            [
                "534 Erewhon St",
                "PleasantVille",
                "Rainbow",
                "Vic",
                "3999",
                "534 Erewhon St PeasantVille, Rainbow, Vic  3999"
            ]
            .map(string)
        );
        assert_eq!(
            values_of(
                "Patient.telecom.where(system='phone')",
                SearchType::Token,
                &patient
            ),
            [
                token(None, Some("(03) 5555 6473"), Some("work")),
                token(None, Some("(03) 3410 5613"), Some("mobile")),
                token(None, Some("(03) 5555 8834"), Some("old")),
            ]
        );
        assert_eq!(
            values_of("Patient.birthDate", SearchType::Date, &patient),
            [day("1974-12-25")]
        );
        assert_eq!(
            values_of("Patient.identifier", SearchType::Token, &patient),
            [token(
                Some("urn:oid:1.2.36.146.595.217.0.1"),
                Some("12345"),
                None
            )]
        );
        assert_eq!(
            values_of(
                "Patient.managingOrganization",
                SearchType::Reference,
                &patient
            ),
            [reference(
                "Organization/1",
                Some(("Organization", "1", None)),
                None
            )]
        );
        assert_eq!(
            values_of(
                "Patient.deceased.exists() and Patient.deceased != false",
                SearchType::Token,
                &patient
            ),
            [token(None, Some("false"), None)]
        );
        assert_eq!(
            values_of("Patient.gender", SearchType::Token, &patient),
            [token(None, Some("male"), None)]
        );
    }

    #[test]
    fn observation_example_values() {
        let Some(dir) = examples_dir() else { return };
        let observation = read_json(&dir.join("Observation-example.json"));
        let codes = values_of("Observation.code", SearchType::Token, &observation);
        assert_eq!(codes.len(), 4);
        assert_eq!(
            codes[0],
            token(
                Some("http://loinc.org"),
                Some("29463-7"),
                Some("Body Weight")
            )
        );
        assert_eq!(
            values_of(
                "(Observation.value as Quantity)",
                SearchType::Quantity,
                &observation
            ),
            [SearchValue::Quantity {
                value: 185.0,
                low: 184.5,
                high: 185.5,
                system: Some("http://unitsofmeasure.org".to_owned()),
                code: Some("[lb_av]".to_owned()),
                unit: Some("lbs".to_owned())
            }]
        );
        assert_eq!(
            values_of("Observation.effective", SearchType::Date, &observation),
            [day("2016-03-28")]
        );
        assert_eq!(
            values_of(
                "Observation.subject.where(resolve() is Patient)",
                SearchType::Reference,
                &observation
            ),
            [reference(
                "Patient/example",
                Some(("Patient", "example", None)),
                None
            )]
        );

        let measured = read_json(&dir.join("Observation-f001.json"));
        assert_eq!(
            values_of("Observation.effective", SearchType::Date, &measured),
            [SearchValue::Date {
                low: micros("2013-04-02T08:30:10Z"),
                high: i64::MAX
            }]
        );
        let ordered = read_json(&dir.join("ServiceRequest-myringotomy.json"));
        assert_eq!(
            values_of("ServiceRequest.subject", SearchType::Reference, &ordered),
            [reference(
                "https://fhir.orionhealth.com/blaze/fhir/Patient/77662",
                Some(("Patient", "77662", None)),
                None
            )]
        );
        let plan = read_json(&dir.join("CarePlan-example.json"));
        assert_eq!(
            values_of("CarePlan.period", SearchType::Date, &plan),
            [SearchValue::Date {
                low: i64::MIN,
                high: micros("2017-06-02T00:00:00Z")
            }]
        );
        let prescription = read_json(&dir.join("MedicationRequest-medrx0303.json"));
        assert_eq!(
            values_of(
                "MedicationRequest.dosageInstruction.first().timing",
                SearchType::Date,
                &prescription
            ),
            [SearchValue::Date {
                low: micros("2015-01-16T00:00:00Z"),
                high: micros("2015-01-21T00:00:00Z")
            }]
        );
    }
}
