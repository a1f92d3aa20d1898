//! Parsing a FHIR search query into typed criteria (<http://hl7.org/fhir/R4/search.html>).
//!
//! [`parse`] takes the query's `(name, value)` pairs, already percent-decoded, and sorts them
//! into:
//! - [`Criterion`]s, the filters: one per occurrence of a parameter. Occurrences are ANDed (a
//!   parameter may repeat); the comma-separated values of one occurrence are alternatives, ORed.
//! - [`Control`], the result parameters (`_count`, `_sort`, `_include`, ...).
//! - [`Ignored`], what this server does not know or support, with the reason, so that the caller
//!   can fail under `Prefer: handling=strict` or report it under lenient handling.
//! - Or a [`QueryError`] for a value that is malformed for its parameter's type. That is fatal in
//!   either handling mode, because dropping a malformed value would silently widen the result.
//!
//! # Escaping
//! In a value, `\,` `\|` `\$` and `\\` stand for the character after the backslash; unescaped,
//! `,` separates alternatives, `|` the parts of a token or quantity, `$` the components of a
//! composite. Values are split on the unescaped separators first and unescaped last, so an
//! escaped `|` inside a token's code survives the split on `,`. A backslash before any other
//! character is kept as written.
//!
//! # Privacy
//! Values can be PHI (a name, a birth date, an identifier). Errors and ignore reasons name
//! parameters but never repeat a value.
//!
//! # Choices where R4 leaves room
//! - An empty parameter (`name=`) is dropped without a word: R4 says empty parameters "are not
//!   an error - they are just ignored". An empty alternative (`name=a,,b`) is an error instead:
//!   read as "no constraint" it would widen the OR to everything.
//! - A result parameter that can only be given once (`_count`, `_sort`, ...) keeps its first
//!   occurrence; repeats are ignored with a reason.
//! - `_include:recurse`, STU3's spelling, is read as `_include:iterate`.
//! - Chains and `_has` nest at most [`MAX_NESTING`] levels together.
//! - `:of-type` is accepted on any token parameter: the parameter's definition does not say
//!   whether its element is an Identifier, and on other elements it matches nothing.

use super::fhirpath;
use super::values::{self, SearchType};

/// How deeply chains (`subject.organization.name`) and reverse chains (`_has:...`) may nest,
/// counted together; each level is a join for the engine.
pub const MAX_NESTING: usize = 3;

/// The type name passed to [`ParameterLookup::lookup`] in a system-level search: only the
/// parameters every resource type has are known there.
pub const SYSTEM_LEVEL_TYPE: &str = "Resource";

/// Parameters R4 defines that this server does not implement.
const UNSUPPORTED_PARAMETERS: &[&str] = &[
    "_offset",
    "_contained",
    "_containedType",
    "_list",
    "_query",
    "_filter",
    "_text",
    "_content",
];

/// Result parameters given once; a repeat is ignored.
const SINGLE_CONTROL_PARAMETERS: &[&str] = &[
    "_count",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_cursor",
    "_type",
];

/// The characters a backslash escapes in a search value.
const ESCAPABLE: [char; 4] = [',', '|', '$', '\\'];

/// What the parser needs to know about a search parameter (the engine implements it from the
/// official R4 SearchParameter definitions).
pub trait ParameterLookup {
    /// The parameter `code` on `resource_type`, including the common ones (`_id`,
    /// `_lastUpdated`, `_tag`, ...) that the lookup knows; `None` for an unknown parameter.
    fn lookup(&self, resource_type: &str, code: &str) -> Option<ParameterInfo>;
}

/// What a search parameter is, as far as parsing a query is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterInfo {
    pub search_type: SearchType,
    /// The resource types a reference parameter may point to; empty when any type may be.
    pub targets: Vec<String>,
    /// For a composite parameter: its components' types, in order.
    pub components: Vec<SearchType>,
}

/// The comparison prefix of a date, number or quantity value; `Eq` when none is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefix {
    #[default]
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    /// The prefix at the start of a value and the rest of it; no prefix (`Eq`) when the value
    /// does not start with one of the nine two-letter prefixes.
    fn split(text: &str) -> (Prefix, &str) {
        let prefix = match text.get(..2) {
            Some("eq") => Prefix::Eq,
            Some("ne") => Prefix::Ne,
            Some("gt") => Prefix::Gt,
            Some("lt") => Prefix::Lt,
            Some("ge") => Prefix::Ge,
            Some("le") => Prefix::Le,
            Some("sa") => Prefix::Sa,
            Some("eb") => Prefix::Eb,
            Some("ap") => Prefix::Ap,
            _ => return (Prefix::Eq, text),
        };
        (prefix, text.get(2..).unwrap_or_default())
    }
}

/// The system part of a token value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSystem {
    /// `code`: any system, or none.
    Any,
    /// `|code`: only codes without a system.
    NoSystem,
    /// `system|code` or `system|`.
    Is(String),
}

/// A parameter's modifier (`name:exact`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    Exact,
    Contains,
    Text,
    Not,
    Missing,
    Identifier,
    /// `subject:Patient`: the reference must point to this resource type.
    Type(String),
    Below,
    Above,
    OfType,
}

/// One alternative of a criterion's value, typed by its parameter (and modifier).
#[derive(Debug, Clone, PartialEq)]
pub enum QueryValue {
    /// A string value, or a token's `:text`; unescaped.
    String(String),
    /// `code`, `|code`, `system|code` or `system|` (no code); also a reference's
    /// `:identifier`.
    Token {
        system: TokenSystem,
        code: Option<String>,
    },
    /// `:of-type`: `type-system|type-code|value` for an Identifier; the type's system may be
    /// left empty.
    OfType {
        type_system: Option<String>,
        type_code: String,
        value: String,
    },
    /// A reference: `123` (with `resource_type` from a `:Type` modifier, if any),
    /// `Patient/123`, `Patient/123/_history/2`, an absolute URL
    /// (`http://example.org/fhir/Patient/123`: `url` is the whole text, and type, id and
    /// version are parsed from it when it is a literal FHIR reference), or a canonical
    /// `http://example.org/ValueSet/vs|1.0` (`url` is the part before `|`, `version` the part
    /// after it). `id` is `None` only for a URL that is not a literal reference (`urn:uuid:…`).
    Reference {
        resource_type: Option<String>,
        id: Option<String>,
        version: Option<String>,
        url: Option<String>,
    },
    /// A date's range `[low, high)` in microseconds since the epoch, as
    /// [`values::parse_date_range`] reads it.
    Date {
        prefix: Prefix,
        low: i64,
        high: i64,
    },
    /// A number with its precision range `[low, high)`, as [`values::parse_decimal_range`]
    /// reads it.
    Number {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
    },
    /// `5.4`, `5.4||mg` or `5.4|http://unitsofmeasure.org|mg`; empty parts are `None`.
    Quantity {
        prefix: Prefix,
        value: f64,
        low: f64,
        high: f64,
        system: Option<String>,
        code: Option<String>,
    },
    Uri(String),
    /// `:missing=true` or `:missing=false`.
    Boolean(bool),
    /// The components of a composite value (split on unescaped `$`), each parsed by its
    /// component's type.
    Composite(Vec<QueryValue>),
}

/// One filter of the query.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    /// `name[:modifier]=v1,v2`; the values are alternatives (OR).
    Plain {
        resource_type: String,
        code: String,
        search_type: SearchType,
        modifier: Option<Modifier>,
        values: Vec<QueryValue>,
    },
    /// `subject:Patient.name=x` or `subject.name=x`: the reference `code` points to a resource
    /// of one of `target_types` that matches `inner`. `inner` was parsed against the first of
    /// them; the others know the inner parameter too and accepted the value.
    Chain {
        resource_type: String,
        code: String,
        target_types: Vec<String>,
        inner: Box<Criterion>,
    },
    /// `_has:Observation:patient:code=x`: resources that some `source_type` resource
    /// references through its `reference_code` parameter, where that resource matches `inner`.
    Has {
        resource_type: String,
        source_type: String,
        reference_code: String,
        inner: Box<Criterion>,
    },
}

/// An `_include` (`Observation:subject:Patient`) or `_revinclude`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The type whose reference is followed (the referencing type, for `_revinclude`).
    pub source_type: String,
    /// The reference parameter, or `*` for all of the source type's reference parameters.
    pub code: String,
    pub target_type: Option<String>,
    /// `:iterate`: also follow it from included resources.
    pub iterate: bool,
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalMode {
    None,
    Estimate,
    Accurate,
}

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryMode {
    True,
    Text,
    Data,
    Count,
    False,
}

/// The result parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Control {
    /// `_count`: a positive page size (the caller applies its own maximum).
    pub count: Option<usize>,
    /// `_sort`: parameter codes, `true` for descending (`-date`).
    pub sort: Vec<(String, bool)>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub total: Option<TotalMode>,
    pub summary: Option<SummaryMode>,
    pub elements: Option<Vec<String>>,
    /// `_cursor`, this server's opaque paging token, passed through.
    pub cursor: Option<String>,
    /// `_type`, in a system-level search.
    pub types: Option<Vec<String>>,
}

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedQuery {
    pub criteria: Vec<Criterion>,
    pub control: Control,
    pub ignored: Vec<Ignored>,
}

/// A parameter (or part of one) left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The parameter's name as given.
    pub name: String,
    pub reason: String,
}

/// A malformed value. Messages name the parameter, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the value of {parameter} is not a valid {expected}")]
    InvalidValue { parameter: String, expected: String },
    #[error(
        "the value of {parameter} has an empty alternative (a comma at an end or after another)"
    )]
    EmptyAlternative { parameter: String },
    #[error("the value of {parameter} needs {expected} components separated by '$'")]
    ComponentCount { parameter: String, expected: usize },
    #[error("the value of {parameter} refers to a different resource type than its type modifier")]
    ReferenceTypeMismatch { parameter: String },
}

/// Parses a search query. `resource_type` is `None` for a system-level search, where only the
/// common parameters are known (looked up on [`SYSTEM_LEVEL_TYPE`]).
pub fn parse(
    resource_type: Option<&str>,
    pairs: &[(String, String)],
    lookup: &dyn ParameterLookup,
) -> Result<ParsedQuery, QueryError> {
    let parser = Parser {
        lookup,
        searched_type: resource_type.unwrap_or(SYSTEM_LEVEL_TYPE),
        system_level: resource_type.is_none(),
    };
    let mut query = ParsedQuery::default();
    let mut controls_seen: Vec<&str> = Vec::new();
    for (name, value) in pairs {
        if value.is_empty() {
            continue;
        }
        let (base, modifier) = match name.split_once(':') {
            Some((base, modifier)) => (base, Some(modifier)),
            None => (name.as_str(), None),
        };
        let ignore = |reason: String| Ignored {
            name: name.clone(),
            reason,
        };
        match base {
            "_format" | "_pretty" => {}
            "_include" | "_revinclude" => match parser.include(base, modifier, value) {
                Ok(include) if base == "_include" => query.control.includes.push(include),
                Ok(include) => query.control.revincludes.push(include),
                Err(reason) => query.ignored.push(ignore(reason)),
            },
            _ if SINGLE_CONTROL_PARAMETERS.contains(&base) => {
                if modifier.is_some() {
                    query
                        .ignored
                        .push(ignore(format!("{base} takes no modifier")));
                } else if controls_seen.contains(&base) {
                    query.ignored.push(ignore(format!(
                        "{base} is repeated; only its first occurrence is used"
                    )));
                } else {
                    controls_seen.push(base);
                    parser.control(base, value, &mut query.control, &mut query.ignored)?;
                }
            }
            _ if UNSUPPORTED_PARAMETERS.contains(&base) => {
                query
                    .ignored
                    .push(ignore(format!("{base} is not supported")));
            }
            _ => {
                let occurrence = Occurrence { name, value };
                match parser.criterion(parser.searched_type, name, occurrence, 0)? {
                    Parsed::Criterion(criterion) => query.criteria.push(criterion),
                    Parsed::Ignored(reason) => query.ignored.push(ignore(reason)),
                }
            }
        }
    }
    Ok(query)
}

/// Splits `text` on each `sep` that is not escaped by a backslash, then unescapes each piece
/// (`\,` `\|` `\$` `\\`; a backslash before any other character is kept).
pub fn split_escaped(text: &str, sep: char) -> Vec<String> {
    split_raw(text, sep).into_iter().map(unescape).collect()
}

/// Splits on each unescaped `separator`, keeping the escapes for a later split or [`unescape`].
fn split_raw(text: &str, separator: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut characters = text.char_indices();
    while let Some((index, character)) = characters.next() {
        if character == '\\' {
            // Whatever follows a backslash does not separate.
            characters.next();
        } else if character == separator {
            pieces.push(text.get(start..index).unwrap_or_default());
            start = index + character.len_utf8();
        }
    }
    pieces.push(text.get(start..).unwrap_or_default());
    pieces
}

fn unescape(text: &str) -> String {
    let mut unescaped = String::with_capacity(text.len());
    let mut characters = text.chars();
    while let Some(character) = characters.next() {
        if character != '\\' {
            unescaped.push(character);
            continue;
        }
        match characters.next() {
            Some(escaped) if ESCAPABLE.contains(&escaped) => unescaped.push(escaped),
            Some(other) => {
                unescaped.push('\\');
                unescaped.push(other);
            }
            None => unescaped.push('\\'),
        }
    }
    unescaped
}

/// A plausible resource type name: a capital letter, then letters and digits.
fn is_type_name(text: &str) -> bool {
    let mut characters = text.chars();
    characters.next().is_some_and(|c| c.is_ascii_uppercase())
        && characters.all(|c| c.is_ascii_alphanumeric())
}

/// One parameter occurrence of the query, as given: what errors and ignore reasons refer to.
#[derive(Clone, Copy)]
struct Occurrence<'q> {
    name: &'q str,
    value: &'q str,
}

impl Occurrence<'_> {
    fn invalid(&self, expected: impl Into<String>) -> QueryError {
        QueryError::InvalidValue {
            parameter: self.name.to_owned(),
            expected: expected.into(),
        }
    }
}

/// A criterion, or why the parameter is left out.
enum Parsed {
    Criterion(Criterion),
    Ignored(String),
}

/// A parameter's code, modifier and definition, on the type it was looked up on.
struct Head<'h> {
    resource_type: &'h str,
    code: &'h str,
    modifier: Option<&'h str>,
    info: ParameterInfo,
}

/// Why one value does not parse, before it is tied to its parameter.
enum ValueProblem {
    Invalid(&'static str),
    ReferenceTypeMismatch,
}

struct Parser<'l> {
    lookup: &'l dyn ParameterLookup,
    searched_type: &'l str,
    system_level: bool,
}

impl Parser<'_> {
    /// A search parameter `name` (possibly a chain or `_has`) on `resource_type`.
    fn criterion(
        &self,
        resource_type: &str,
        name: &str,
        occurrence: Occurrence<'_>,
        nesting: usize,
    ) -> Result<Parsed, QueryError> {
        if let Some(reverse_chain) = name.strip_prefix("_has:") {
            return self.has(resource_type, reverse_chain, occurrence, nesting);
        }
        let (head, chained) = match name.split_once('.') {
            Some((head, rest)) => (head, Some(rest)),
            None => (name, None),
        };
        let (code, modifier) = match head.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (head, None),
        };
        if UNSUPPORTED_PARAMETERS.contains(&code) {
            return Ok(Parsed::Ignored(format!("{code} is not supported")));
        }
        let Some(info) = self.lookup.lookup(resource_type, code) else {
            let reason = if resource_type == SYSTEM_LEVEL_TYPE {
                format!("{code} is not a search parameter of every resource type")
            } else {
                format!("{resource_type} has no search parameter {code}")
            };
            return Ok(Parsed::Ignored(reason));
        };
        let head = Head {
            resource_type,
            code,
            modifier,
            info,
        };
        match chained {
            Some(rest) => self.chain(&head, rest, occurrence, nesting),
            None => self.plain(&head, occurrence),
        }
    }

    fn plain(&self, head: &Head<'_>, occurrence: Occurrence<'_>) -> Result<Parsed, QueryError> {
        let info = &head.info;
        if info.search_type == SearchType::Special {
            return Ok(Parsed::Ignored(format!(
                "{} is a special parameter, which is not supported",
                head.code
            )));
        }
        let modifier = match parse_modifier(info, head.modifier) {
            Ok(modifier) => modifier,
            Err(reason) => return Ok(Parsed::Ignored(reason)),
        };
        let usable_components = !info.components.is_empty()
            && info
                .components
                .iter()
                .all(|c| !matches!(c, SearchType::Composite | SearchType::Special));
        if info.search_type == SearchType::Composite
            && modifier != Some(Modifier::Missing)
            && !usable_components
        {
            return Ok(Parsed::Ignored(format!(
                "the components of {} are not of searchable types",
                head.code
            )));
        }
        let values = split_raw(occurrence.value, ',')
            .into_iter()
            .map(|alternative| {
                if alternative.is_empty() {
                    return Err(QueryError::EmptyAlternative {
                        parameter: occurrence.name.to_owned(),
                    });
                }
                parse_alternative(info, modifier.as_ref(), alternative, occurrence)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Parsed::Criterion(Criterion::Plain {
            resource_type: head.resource_type.to_owned(),
            code: head.code.to_owned(),
            search_type: info.search_type,
            modifier,
            values,
        }))
    }

    /// `code[:Type].rest`: `rest` is parsed on each candidate target type.
    fn chain(
        &self,
        head: &Head<'_>,
        rest: &str,
        occurrence: Occurrence<'_>,
        nesting: usize,
    ) -> Result<Parsed, QueryError> {
        let code = head.code;
        let targets = &head.info.targets;
        if nesting >= MAX_NESTING {
            return Ok(Parsed::Ignored(format!(
                "chains and _has nest at most {MAX_NESTING} levels"
            )));
        }
        if head.info.search_type != SearchType::Reference {
            return Ok(Parsed::Ignored(format!(
                "{code} is not a reference parameter, so it cannot be chained"
            )));
        }
        let candidates: Vec<&str> = match head.modifier {
            None => targets.iter().map(String::as_str).collect(),
            Some(type_name) if is_type_name(type_name) => {
                if !targets.is_empty() && !targets.iter().any(|t| t == type_name) {
                    return Ok(Parsed::Ignored(format!(
                        "{type_name} is not a target type of {code}"
                    )));
                }
                vec![type_name]
            }
            Some(modifier) => {
                return Ok(Parsed::Ignored(format!(
                    ":{modifier} cannot be used in a chain; only a type modifier can"
                )));
            }
        };
        if candidates.is_empty() {
            return Ok(Parsed::Ignored(format!(
                "{code} may refer to any resource type; name one with a type modifier \
                 ({code}:Type.…)"
            )));
        }
        let mut inner = None;
        let mut target_types = Vec::new();
        let mut first_reason = None;
        let mut first_error = None;
        for target in &candidates {
            match self.criterion(target, rest, occurrence, nesting + 1) {
                Ok(Parsed::Criterion(criterion)) => {
                    inner.get_or_insert(criterion);
                    target_types.push((*target).to_owned());
                }
                Ok(Parsed::Ignored(reason)) => {
                    first_reason.get_or_insert(reason);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match (inner, first_error, first_reason) {
            (Some(inner), _, _) => Ok(Parsed::Criterion(Criterion::Chain {
                resource_type: head.resource_type.to_owned(),
                code: code.to_owned(),
                target_types,
                inner: Box::new(inner),
            })),
            (None, Some(error), _) => Err(error),
            (None, None, Some(reason)) if candidates.len() == 1 => Ok(Parsed::Ignored(reason)),
            (None, None, _) => Ok(Parsed::Ignored(format!(
                "none of the target types of {code} ({}) supports {rest}",
                candidates.join(", ")
            ))),
        }
    }

    /// `Type:reference:rest` after `_has:`.
    fn has(
        &self,
        resource_type: &str,
        reverse_chain: &str,
        occurrence: Occurrence<'_>,
        nesting: usize,
    ) -> Result<Parsed, QueryError> {
        if nesting >= MAX_NESTING {
            return Ok(Parsed::Ignored(format!(
                "chains and _has nest at most {MAX_NESTING} levels"
            )));
        }
        let mut parts = reverse_chain.splitn(3, ':');
        let (Some(source_type), Some(reference_code), Some(rest)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Ok(Parsed::Ignored(
                "_has takes the form _has:Type:reference:parameter".to_owned(),
            ));
        };
        if !is_type_name(source_type) || reference_code.is_empty() || rest.is_empty() {
            return Ok(Parsed::Ignored(
                "_has takes the form _has:Type:reference:parameter".to_owned(),
            ));
        }
        let Some(reference) = self.lookup.lookup(source_type, reference_code) else {
            return Ok(Parsed::Ignored(format!(
                "{source_type} has no search parameter {reference_code}"
            )));
        };
        if reference.search_type != SearchType::Reference {
            return Ok(Parsed::Ignored(format!(
                "{reference_code} of {source_type} is not a reference parameter"
            )));
        }
        let refers_here = reference.targets.is_empty()
            || resource_type == SYSTEM_LEVEL_TYPE
            || reference.targets.iter().any(|t| t == resource_type);
        if !refers_here {
            return Ok(Parsed::Ignored(format!(
                "{reference_code} of {source_type} does not refer to {resource_type}"
            )));
        }
        Ok(
            match self.criterion(source_type, rest, occurrence, nesting + 1)? {
                Parsed::Criterion(inner) => Parsed::Criterion(Criterion::Has {
                    resource_type: resource_type.to_owned(),
                    source_type: source_type.to_owned(),
                    reference_code: reference_code.to_owned(),
                    inner: Box::new(inner),
                }),
                ignored @ Parsed::Ignored(_) => ignored,
            },
        )
    }

    /// A result parameter given once; a problem that only narrows what is returned goes to
    /// `ignored`, one that would widen the result is an error.
    fn control(
        &self,
        name: &str,
        value: &str,
        control: &mut Control,
        ignored: &mut Vec<Ignored>,
    ) -> Result<(), QueryError> {
        let mut ignore = |reason: String| {
            ignored.push(Ignored {
                name: name.to_owned(),
                reason,
            });
        };
        match name {
            // `_count=0` asks for the total alone (like `_summary=count`).
            "_count" => match value.parse::<usize>() {
                Ok(count) => control.count = Some(count),
                _ => {
                    return Err(QueryError::InvalidValue {
                        parameter: name.to_owned(),
                        expected: "non-negative integer".to_owned(),
                    })
                }
            },
            "_sort" => {
                for key in value.split(',') {
                    let (code, descending) = match key.strip_prefix('-') {
                        Some(code) => (code, true),
                        None => (key, false),
                    };
                    if code.is_empty() {
                        ignore("_sort has an empty key".to_owned());
                    } else if self.is_sortable(code) {
                        control.sort.push((code.to_owned(), descending));
                    } else {
                        // The key is client text and is not echoed (it could hold anything);
                        // the client has its own request to compare with.
                        ignore(format!(
                            "a _sort key is not a search parameter of {}",
                            self.searched_type
                        ));
                    }
                }
            }
            "_total" => match value {
                "none" => control.total = Some(TotalMode::None),
                "estimate" => control.total = Some(TotalMode::Estimate),
                "accurate" => control.total = Some(TotalMode::Accurate),
                _ => ignore("_total is none, estimate or accurate".to_owned()),
            },
            "_summary" => match value {
                "true" => control.summary = Some(SummaryMode::True),
                "text" => control.summary = Some(SummaryMode::Text),
                "data" => control.summary = Some(SummaryMode::Data),
                "count" => control.summary = Some(SummaryMode::Count),
                "false" => control.summary = Some(SummaryMode::False),
                _ => ignore("_summary is true, text, data, count or false".to_owned()),
            },
            "_elements" => {
                let elements: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|element| !element.is_empty())
                    .map(str::to_owned)
                    .collect();
                if elements.is_empty() {
                    ignore("_elements names no element".to_owned());
                } else {
                    control.elements = Some(elements);
                }
            }
            "_cursor" => control.cursor = Some(value.to_owned()),
            "_type" => {
                if !self.system_level {
                    ignore("_type applies to system-level search only".to_owned());
                    return Ok(());
                }
                let types: Vec<String> = value.split(',').map(|t| t.trim().to_owned()).collect();
                // Dropping a misspelt type would search all the others: an error, not a skip.
                if !types.iter().all(|t| is_type_name(t)) {
                    return Err(QueryError::InvalidValue {
                        parameter: name.to_owned(),
                        expected: "list of resource types".to_owned(),
                    });
                }
                control.types = Some(types);
            }
            _ => ignore(format!("{name} is not supported")),
        }
        Ok(())
    }

    fn is_sortable(&self, code: &str) -> bool {
        matches!(code, "_id" | "_lastUpdated")
            || self
                .lookup
                .lookup(self.searched_type, code)
                .is_some_and(|info| {
                    !matches!(
                        info.search_type,
                        SearchType::Composite | SearchType::Special
                    )
                })
    }

    /// `_include` or `_revinclude` (`name`) with its modifier; `Err` is the reason to ignore it.
    fn include(&self, name: &str, modifier: Option<&str>, value: &str) -> Result<Include, String> {
        let iterate = match modifier {
            None => false,
            Some("iterate" | "recurse") => true,
            Some(other) => return Err(format!(":{other} does not apply to {name}")),
        };
        if value == "*" {
            if name == "_revinclude" || self.system_level {
                return Err(format!("{name}=* needs a source type here: Type:*"));
            }
            return Ok(Include {
                source_type: self.searched_type.to_owned(),
                code: "*".to_owned(),
                target_type: None,
                iterate,
            });
        }
        let parts: Vec<&str> = value.split(':').collect();
        let (source_type, code, target_type) = match parts.as_slice() {
            [source, code] => (*source, *code, None),
            [source, code, target] => (*source, *code, Some(*target)),
            _ => {
                return Err(format!(
                    "{name} takes Type:parameter or Type:parameter:Type"
                ))
            }
        };
        if !is_type_name(source_type) || !target_type.is_none_or(is_type_name) {
            return Err(format!(
                "{name} takes Type:parameter or Type:parameter:Type"
            ));
        }
        if code != "*" {
            let Some(info) = self.lookup.lookup(source_type, code) else {
                return Err(format!("{source_type} has no search parameter {code}"));
            };
            if info.search_type != SearchType::Reference {
                return Err(format!(
                    "{code} of {source_type} is not a reference parameter"
                ));
            }
            if let Some(target) = target_type {
                if !info.targets.is_empty() && !info.targets.iter().any(|t| t == target) {
                    return Err(format!("{target} is not a target type of {code}"));
                }
            }
        }
        Ok(Include {
            source_type: source_type.to_owned(),
            code: code.to_owned(),
            target_type: target_type.map(str::to_owned),
            iterate,
        })
    }
}

/// The modifier as the parameter's type allows it; `Err` is the reason to ignore the parameter.
fn parse_modifier(info: &ParameterInfo, text: Option<&str>) -> Result<Option<Modifier>, String> {
    let Some(text) = text else { return Ok(None) };
    let modifier = match (info.search_type, text) {
        (_, "missing") => Modifier::Missing,
        (SearchType::String, "exact") => Modifier::Exact,
        (SearchType::String, "contains") => Modifier::Contains,
        (SearchType::Token, "text") => Modifier::Text,
        (SearchType::Token, "not") => Modifier::Not,
        (SearchType::Token, "of-type") => Modifier::OfType,
        (SearchType::Reference, "identifier") => Modifier::Identifier,
        (SearchType::Uri, "below") => Modifier::Below,
        (SearchType::Uri, "above") => Modifier::Above,
        (SearchType::Token, "above" | "below" | "in" | "not-in")
        | (SearchType::Reference, "above" | "below") => {
            return Err(format!("the :{text} modifier is not supported"));
        }
        (SearchType::Reference, type_name) if is_type_name(type_name) => {
            if !info.targets.is_empty() && !info.targets.iter().any(|t| t == type_name) {
                return Err(format!(
                    "{type_name} is not a target type of this parameter"
                ));
            }
            Modifier::Type(type_name.to_owned())
        }
        (search_type, _) => {
            return Err(format!(
                "the :{text} modifier does not apply to {} parameters",
                search_type.as_str()
            ));
        }
    };
    Ok(Some(modifier))
}

/// One alternative (still escaped) of a parameter's value.
fn parse_alternative(
    info: &ParameterInfo,
    modifier: Option<&Modifier>,
    raw: &str,
    occurrence: Occurrence<'_>,
) -> Result<QueryValue, QueryError> {
    let parsed = match modifier {
        Some(Modifier::Missing) => match raw {
            "true" => Ok(QueryValue::Boolean(true)),
            "false" => Ok(QueryValue::Boolean(false)),
            _ => Err(ValueProblem::Invalid("boolean (true or false)")),
        },
        Some(Modifier::Exact) => Ok(QueryValue::String(unescape(raw))),
        Some(Modifier::Text) => parse_search_text(raw),
        Some(Modifier::OfType) => parse_of_type(raw),
        Some(Modifier::Identifier) => parse_token(raw),
        Some(Modifier::Type(type_name)) => parse_reference(raw, Some(type_name)),
        _ if info.search_type == SearchType::Composite => {
            return parse_composite(&info.components, raw, occurrence);
        }
        _ => parse_scalar(info.search_type, raw),
    };
    parsed.map_err(|problem| match problem {
        ValueProblem::Invalid(expected) => occurrence.invalid(expected),
        ValueProblem::ReferenceTypeMismatch => QueryError::ReferenceTypeMismatch {
            parameter: occurrence.name.to_owned(),
        },
    })
}

/// A value of one of the non-composite types, without modifier.
fn parse_scalar(search_type: SearchType, raw: &str) -> Result<QueryValue, ValueProblem> {
    match search_type {
        SearchType::String => parse_search_text(raw),
        SearchType::Uri => Ok(QueryValue::Uri(unescape(raw))),
        SearchType::Token => parse_token(raw),
        SearchType::Reference => parse_reference(raw, None),
        SearchType::Date => {
            let (prefix, date) = Prefix::split(raw);
            let (low, high) =
                values::parse_date_range(date).ok_or(ValueProblem::Invalid("date"))?;
            Ok(QueryValue::Date { prefix, low, high })
        }
        SearchType::Number => {
            let (prefix, number) = Prefix::split(raw);
            let (value, low, high) =
                values::parse_decimal_range(number).ok_or(ValueProblem::Invalid("number"))?;
            Ok(QueryValue::Number {
                prefix,
                value,
                low,
                high,
            })
        }
        SearchType::Quantity => parse_quantity(raw),
        SearchType::Composite | SearchType::Special => {
            Err(ValueProblem::Invalid(search_type.as_str()))
        }
    }
}

fn parse_composite(
    components: &[SearchType],
    raw: &str,
    occurrence: Occurrence<'_>,
) -> Result<QueryValue, QueryError> {
    let pieces = split_raw(raw, '$');
    if pieces.len() != components.len() {
        return Err(QueryError::ComponentCount {
            parameter: occurrence.name.to_owned(),
            expected: components.len(),
        });
    }
    let mut parsed_components = Vec::with_capacity(pieces.len());
    for (position, (piece, component_type)) in pieces.into_iter().zip(components).enumerate() {
        let component = if piece.is_empty() {
            Err(ValueProblem::Invalid(component_type.as_str()))
        } else {
            parse_scalar(*component_type, piece)
        };
        match component {
            Ok(value) => parsed_components.push(value),
            Err(ValueProblem::Invalid(expected)) => {
                return Err(occurrence.invalid(format!("{expected} in component {}", position + 1)))
            }
            Err(ValueProblem::ReferenceTypeMismatch) => {
                return Err(QueryError::ReferenceTypeMismatch {
                    parameter: occurrence.name.to_owned(),
                })
            }
        }
    }
    Ok(QueryValue::Composite(parsed_components))
}

/// Text compared by prefix or substring after normalisation. Blank text would match every
/// value, so it is refused rather than read as "no constraint".
fn parse_search_text(raw: &str) -> Result<QueryValue, ValueProblem> {
    let text = unescape(raw);
    if values::normalize_string(&text).is_empty() {
        return Err(ValueProblem::Invalid("search string (it is blank)"));
    }
    Ok(QueryValue::String(text))
}

/// `code`, `|code`, `system|code` or `system|`.
fn parse_token(raw: &str) -> Result<QueryValue, ValueProblem> {
    let invalid = ValueProblem::Invalid("token");
    match split_raw(raw, '|').as_slice() {
        [code] if !code.is_empty() => Ok(QueryValue::Token {
            system: TokenSystem::Any,
            code: Some(unescape(code)),
        }),
        [system, code] => {
            let code = (!code.is_empty()).then(|| unescape(code));
            if system.is_empty() {
                // `|` alone says nothing.
                let code = code.ok_or(invalid)?;
                Ok(QueryValue::Token {
                    system: TokenSystem::NoSystem,
                    code: Some(code),
                })
            } else {
                Ok(QueryValue::Token {
                    system: TokenSystem::Is(unescape(system)),
                    code,
                })
            }
        }
        _ => Err(invalid),
    }
}

/// `type-system|type-code|value`, the type's system possibly empty.
fn parse_of_type(raw: &str) -> Result<QueryValue, ValueProblem> {
    match split_raw(raw, '|').as_slice() {
        [type_system, type_code, value] if !type_code.is_empty() && !value.is_empty() => {
            Ok(QueryValue::OfType {
                type_system: (!type_system.is_empty()).then(|| unescape(type_system)),
                type_code: unescape(type_code),
                value: unescape(value),
            })
        }
        _ => Err(ValueProblem::Invalid(
            "identifier of a type (type-system|type-code|value)",
        )),
    }
}

/// `[prefix]number`, `[prefix]number||code` or `[prefix]number|system|code`.
fn parse_quantity(raw: &str) -> Result<QueryValue, ValueProblem> {
    let invalid = ValueProblem::Invalid("quantity");
    let (prefix, rest) = Prefix::split(raw);
    let (number, system, code) = match split_raw(rest, '|').as_slice() {
        [number] => (*number, None, None),
        [number, system, code] => (
            *number,
            (!system.is_empty()).then(|| unescape(system)),
            (!code.is_empty()).then(|| unescape(code)),
        ),
        _ => return Err(invalid),
    };
    let (value, low, high) = values::parse_decimal_range(number).ok_or(invalid)?;
    Ok(QueryValue::Quantity {
        prefix,
        value,
        low,
        high,
        system,
        code,
    })
}

/// A reference value; `type_modifier` is the `:Type` of `subject:Patient=123`.
fn parse_reference(raw: &str, type_modifier: Option<&str>) -> Result<QueryValue, ValueProblem> {
    let invalid = || ValueProblem::Invalid("reference");
    let (text, canonical_version) = match split_raw(raw, '|').as_slice() {
        [text] => (unescape(text), None),
        [text, version] if !text.is_empty() && !version.is_empty() => {
            (unescape(text), Some(unescape(version)))
        }
        _ => return Err(invalid()),
    };
    let check_type = |resource_type: &str| match type_modifier {
        Some(wanted) if wanted != resource_type => Err(ValueProblem::ReferenceTypeMismatch),
        _ => Ok(()),
    };
    // An id never has a ':', so a ':' means an absolute URL or URN (`urn:uuid:…`).
    if text.contains(':') {
        let literal = fhirpath::parse_literal_reference(&text).filter(|l| l.base.is_some());
        let (resource_type, id, history_version) = match literal {
            Some(literal) => {
                check_type(literal.resource_type)?;
                (
                    Some(literal.resource_type.to_owned()),
                    Some(literal.id.to_owned()),
                    literal.version.map(str::to_owned),
                )
            }
            None => (None, None, None),
        };
        if canonical_version.is_some() && history_version.is_some() {
            return Err(invalid());
        }
        return Ok(QueryValue::Reference {
            resource_type,
            id,
            version: canonical_version.or(history_version),
            url: Some(text),
        });
    }
    if canonical_version.is_some() {
        return Err(invalid());
    }
    if text.contains('/') {
        let literal = fhirpath::parse_literal_reference(&text)
            .filter(|l| l.base.is_none())
            .ok_or_else(invalid)?;
        check_type(literal.resource_type)?;
        return Ok(QueryValue::Reference {
            resource_type: Some(literal.resource_type.to_owned()),
            id: Some(literal.id.to_owned()),
            version: literal.version.map(str::to_owned),
            url: None,
        });
    }
    Ok(QueryValue::Reference {
        resource_type: type_modifier.map(str::to_owned),
        id: Some(text),
        version: None,
        url: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Knows a few R4 parameters, enough for every rule here.
    struct TestLookup;

    impl ParameterLookup for TestLookup {
        fn lookup(&self, resource_type: &str, code: &str) -> Option<ParameterInfo> {
            use SearchType::{
                Composite, Date, Number, Quantity, Reference, Special, String, Token, Uri,
            };
            let (search_type, targets, components): (SearchType, &[&str], &[SearchType]) =
                match (resource_type, code) {
                    (_, "_id" | "_tag" | "_security") => (Token, &[], &[]),
                    (_, "_lastUpdated") => (Date, &[], &[]),
                    (_, "_profile") => (Uri, &[], &[]),
                    (_, "_text") => (String, &[], &[]),
                    ("Observation", "subject") => {
                        (Reference, &["Patient", "Group", "Device", "Location"], &[])
                    }
                    ("Observation", "patient") | ("Encounter", "patient") => {
                        (Reference, &["Patient"], &[])
                    }
                    ("Observation", "performer") => {
                        (Reference, &["Practitioner", "Organization", "Patient"], &[])
                    }
                    ("Observation", "focus")
                    | ("AuditEvent", "entity")
                    | ("Provenance", "target") => (Reference, &[], &[]),
                    ("Observation", "code" | "identifier") => (Token, &[], &[]),
                    ("Observation", "date") => (Date, &[], &[]),
                    ("Observation", "value-quantity") => (Quantity, &[], &[]),
                    ("Observation", "value-string") => (String, &[], &[]),
                    ("Observation", "code-value-quantity") => (Composite, &[], &[Token, Quantity]),
                    ("Observation", "code-value-string") => (Composite, &[], &[Token, String]),
                    ("Observation", "broken-composite") => (Composite, &[], &[]),
                    ("Patient", "name" | "family") => (String, &[], &[]),
                    ("Patient", "birthdate") => (Date, &[], &[]),
                    ("Patient", "gender" | "identifier") => (Token, &[], &[]),
                    ("Patient", "organization") => (Reference, &["Organization"], &[]),
                    ("Patient", "link") => (Reference, &["Patient", "RelatedPerson"], &[]),
                    ("Organization" | "Location" | "Practitioner", "name") => (String, &[], &[]),
                    ("Organization", "partof") => (Reference, &["Organization"], &[]),
                    ("Group", "code") => (Token, &[], &[]),
                    ("Location", "near") => (Special, &[], &[]),
                    ("RiskAssessment", "probability") => (Number, &[], &[]),
                    ("ValueSet", "url") => (Uri, &[], &[]),
                    _ => return None,
                };
            Some(ParameterInfo {
                search_type,
                targets: targets.iter().map(|t| (*t).to_owned()).collect(),
                components: components.to_vec(),
            })
        }
    }

    fn pairs(query: &[(&str, &str)]) -> Vec<(std::string::String, std::string::String)> {
        query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn parse_on(resource_type: &str, query: &[(&str, &str)]) -> ParsedQuery {
        parse(Some(resource_type), &pairs(query), &TestLookup)
            .unwrap_or_else(|error| panic!("{query:?}: {error}"))
    }

    fn error_on(resource_type: &str, name: &str, value: &str) -> QueryError {
        match parse(Some(resource_type), &pairs(&[(name, value)]), &TestLookup) {
            Ok(parsed) => panic!("{name}={value} parsed: {parsed:?}"),
            Err(error) => error,
        }
    }

    /// The one criterion of `name=value`.
    fn criterion(resource_type: &str, name: &str, value: &str) -> Criterion {
        let parsed = parse_on(resource_type, &[(name, value)]);
        match <[Criterion; 1]>::try_from(parsed.criteria) {
            Ok([criterion]) if parsed.ignored.is_empty() => criterion,
            other => panic!("{name}={value}: {other:?}, ignored {:?}", parsed.ignored),
        }
    }

    /// The modifier and values of the plain criterion `name=value`.
    fn plain(resource_type: &str, name: &str, value: &str) -> (Option<Modifier>, Vec<QueryValue>) {
        match criterion(resource_type, name, value) {
            Criterion::Plain {
                modifier, values, ..
            } => (modifier, values),
            other => panic!("{name}={value}: {other:?}"),
        }
    }

    /// The reason `name=value` is ignored.
    fn ignored_reason(resource_type: Option<&str>, name: &str, value: &str) -> String {
        let parsed = parse(resource_type, &pairs(&[(name, value)]), &TestLookup)
            .unwrap_or_else(|error| panic!("{name}={value}: {error}"));
        match parsed.ignored.as_slice() {
            [ignored] if parsed.criteria.is_empty() && ignored.name == name => {
                ignored.reason.clone()
            }
            _ => panic!("{name}={value} not ignored: {parsed:?}"),
        }
    }

    fn string(text: &str) -> QueryValue {
        QueryValue::String(text.to_owned())
    }

    fn token(system: TokenSystem, code: Option<&str>) -> QueryValue {
        QueryValue::Token {
            system,
            code: code.map(str::to_owned),
        }
    }

    fn is(system: &str) -> TokenSystem {
        TokenSystem::Is(system.to_owned())
    }

    fn reference(
        resource_type: Option<&str>,
        id: Option<&str>,
        version: Option<&str>,
        url: Option<&str>,
    ) -> QueryValue {
        QueryValue::Reference {
            resource_type: resource_type.map(str::to_owned),
            id: id.map(str::to_owned),
            version: version.map(str::to_owned),
            url: url.map(str::to_owned),
        }
    }

    fn date(prefix: Prefix, text: &str) -> QueryValue {
        let (low, high) = values::parse_date_range(text).unwrap_or_else(|| panic!("{text}"));
        QueryValue::Date { prefix, low, high }
    }

    fn quantity(
        prefix: Prefix,
        number: &str,
        system: Option<&str>,
        code: Option<&str>,
    ) -> QueryValue {
        let (value, low, high) =
            values::parse_decimal_range(number).unwrap_or_else(|| panic!("{number}"));
        QueryValue::Quantity {
            prefix,
            value,
            low,
            high,
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
        }
    }

    #[test]
    fn split_escaped_splits_on_unescaped_separators_only() {
        let cases: &[(&str, char, &[&str])] = &[
            ("a,b", ',', &["a", "b"]),
            (r"a\,b", ',', &["a,b"]),
            (r"a\|b", '|', &["a|b"]),
            (r"sys|a\|b", '|', &["sys", "a|b"]),
            (r"a\$b$c", '$', &["a$b", "c"]),
            (r"a\\,b", ',', &[r"a\", "b"]),
            (r"a\\\,b", ',', &[r"a\,b"]),
            (r"a\b", ',', &[r"a\b"]),
            (r"a\", ',', &[r"a\"]),
            (r"\", ',', &[r"\"]),
            ("", ',', &[""]),
            (",", ',', &["", ""]),
            ("é,ü,日本", ',', &["é", "ü", "日本"]),
            (r"\é,x", ',', &[r"\é", "x"]),
            // Other separators' escapes are unescaped too.
            (r"a\|b,c", ',', &["a|b", "c"]),
        ];
        for (text, separator, expected) in cases {
            assert_eq!(split_escaped(text, *separator), *expected, "{text}");
        }
    }

    #[test]
    fn string_values_are_alternatives_and_kept_literally() {
        assert_eq!(
            plain("Patient", "name", "Smith,Jones"),
            (None, vec![string("Smith"), string("Jones")])
        );
        assert_eq!(
            plain("Patient", "name", r"Smith\, John"),
            (None, vec![string("Smith, John")])
        );
        assert_eq!(
            plain("Patient", "name", r"a\|b\$c\\d"),
            (None, vec![string(r"a|b$c\d")])
        );
        for literal in [
            "O'Brien",
            "x'; DROP TABLE resources; --",
            "100%",
            "a_b",
            "%_%",
            "\" OR 1=1 --",
            "a;b",
            "(select 1)",
            "*",
            "?",
        ] {
            assert_eq!(
                plain("Patient", "name", literal),
                (None, vec![string(literal)])
            );
        }
    }

    #[test]
    fn string_modifiers() {
        assert_eq!(plain("Patient", "name", "Eve"), (None, vec![string("Eve")]));
        assert_eq!(
            plain("Patient", "name:exact", "Eve"),
            (Some(Modifier::Exact), vec![string("Eve")])
        );
        assert_eq!(
            plain("Patient", "name:contains", "ev"),
            (Some(Modifier::Contains), vec![string("ev")])
        );
        assert_eq!(
            plain("Patient", "name:missing", "true"),
            (Some(Modifier::Missing), vec![QueryValue::Boolean(true)])
        );
        assert_eq!(
            plain("Patient", "name:missing", "false"),
            (Some(Modifier::Missing), vec![QueryValue::Boolean(false)])
        );
        for modifier in [
            "text",
            "not",
            "below",
            "above",
            "identifier",
            "Patient",
            "nonsense",
            "",
        ] {
            let name = format!("name:{modifier}");
            let reason = ignored_reason(Some("Patient"), &name, "x");
            assert!(
                reason.contains("does not apply to string"),
                "{name}: {reason}"
            );
        }
        for blank in [" ", "  \t", "\u{301}"] {
            assert_eq!(
                error_on("Patient", "name", blank).to_string(),
                "the value of name is not a valid search string (it is blank)"
            );
            assert!(matches!(
                error_on("Patient", "name:contains", blank),
                QueryError::InvalidValue { .. }
            ));
            assert!(matches!(
                error_on("Observation", "code:text", blank),
                QueryError::InvalidValue { .. }
            ));
        }
        assert_eq!(
            plain("Patient", "name:exact", " "),
            (Some(Modifier::Exact), vec![string(" ")])
        );
        assert!(matches!(
            error_on("Patient", "name:missing", "yes"),
            QueryError::InvalidValue { ref expected, .. } if expected.contains("boolean")
        ));
    }

    #[test]
    fn token_values_and_modifiers() {
        let system = "http://loinc.org";
        let cases: &[(&str, QueryValue)] = &[
            ("1234-5", token(TokenSystem::Any, Some("1234-5"))),
            ("|1234-5", token(TokenSystem::NoSystem, Some("1234-5"))),
            ("http://loinc.org|1234-5", token(is(system), Some("1234-5"))),
            ("http://loinc.org|", token(is(system), None)),
            (r"http://loinc.org|a\|b", token(is(system), Some("a|b"))),
            (r"a\|b", token(TokenSystem::Any, Some("a|b"))),
            (r"s\,t|c\$d", token(is("s,t"), Some("c$d"))),
            (
                "x' OR '1'='1",
                token(TokenSystem::Any, Some("x' OR '1'='1")),
            ),
            ("%", token(TokenSystem::Any, Some("%"))),
        ];
        for (text, expected) in cases {
            assert_eq!(
                plain("Observation", "code", text),
                (None, vec![expected.clone()]),
                "{text}"
            );
        }
        assert_eq!(
            plain("Observation", "code", "a,http://loinc.org|b"),
            (
                None,
                vec![
                    token(TokenSystem::Any, Some("a")),
                    token(is(system), Some("b"))
                ]
            )
        );
        assert_eq!(
            plain("Observation", "code:text", r"Body weight\, adult|x"),
            (Some(Modifier::Text), vec![string("Body weight, adult|x")])
        );
        assert_eq!(
            plain("Patient", "gender:not", "male"),
            (
                Some(Modifier::Not),
                vec![token(TokenSystem::Any, Some("male"))]
            )
        );
        assert_eq!(
            plain("Patient", "gender:missing", "true"),
            (Some(Modifier::Missing), vec![QueryValue::Boolean(true)])
        );
        let v2 = "http://terminology.hl7.org/CodeSystem/v2-0203";
        assert_eq!(
            plain("Patient", "identifier:of-type", &format!("{v2}|MR|446053")),
            (
                Some(Modifier::OfType),
                vec![QueryValue::OfType {
                    type_system: Some(v2.to_owned()),
                    type_code: "MR".to_owned(),
                    value: "446053".to_owned(),
                }]
            )
        );
        assert_eq!(
            plain("Patient", "identifier:of-type", r"|MR|a\|b"),
            (
                Some(Modifier::OfType),
                vec![QueryValue::OfType {
                    type_system: None,
                    type_code: "MR".to_owned(),
                    value: "a|b".to_owned(),
                }]
            )
        );
        for modifier in ["above", "below", "in", "not-in"] {
            let reason = ignored_reason(Some("Observation"), &format!("code:{modifier}"), "x");
            assert!(reason.contains("not supported"), "{modifier}: {reason}");
        }
        for modifier in ["exact", "contains", "identifier", "Patient"] {
            let reason = ignored_reason(Some("Observation"), &format!("code:{modifier}"), "x");
            assert!(
                reason.contains("does not apply to token"),
                "{modifier}: {reason}"
            );
        }
        for malformed in ["|", "a|b|c", "||"] {
            assert!(
                matches!(
                    error_on("Observation", "code", malformed),
                    QueryError::InvalidValue { ref expected, .. } if expected == "token"
                ),
                "{malformed}"
            );
        }
        for malformed in ["MR|446053", "sys||v", "sys|MR|", "a|b|c|d"] {
            assert!(
                matches!(
                    error_on("Patient", "identifier:of-type", malformed),
                    QueryError::InvalidValue { .. }
                ),
                "{malformed}"
            );
        }
    }

    #[test]
    fn reference_values_and_modifiers() {
        let cases: &[(&str, QueryValue)] = &[
            ("123", reference(None, Some("123"), None, None)),
            (
                "Patient/123",
                reference(Some("Patient"), Some("123"), None, None),
            ),
            (
                "Patient/123/_history/2",
                reference(Some("Patient"), Some("123"), Some("2"), None),
            ),
            (
                "http://example.org/fhir/Patient/123",
                reference(
                    Some("Patient"),
                    Some("123"),
                    None,
                    Some("http://example.org/fhir/Patient/123"),
                ),
            ),
            (
                "http://example.org/fhir/Patient/123/_history/4",
                reference(
                    Some("Patient"),
                    Some("123"),
                    Some("4"),
                    Some("http://example.org/fhir/Patient/123/_history/4"),
                ),
            ),
            (
                "http://example.org/ValueSet/vs|1.0",
                reference(
                    Some("ValueSet"),
                    Some("vs"),
                    Some("1.0"),
                    Some("http://example.org/ValueSet/vs"),
                ),
            ),
            (
                "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0",
                reference(
                    None,
                    None,
                    None,
                    Some("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"),
                ),
            ),
            ("x'--", reference(None, Some("x'--"), None, None)),
        ];
        for (text, expected) in cases {
            assert_eq!(
                plain("Observation", "subject", text),
                (None, vec![expected.clone()]),
                "{text}"
            );
        }
        let patient = Some(Modifier::Type("Patient".to_owned()));
        assert_eq!(
            plain("Observation", "subject:Patient", "123"),
            (
                patient.clone(),
                vec![reference(Some("Patient"), Some("123"), None, None)]
            )
        );
        assert_eq!(
            plain("Observation", "subject:Patient", "Patient/123"),
            (
                patient,
                vec![reference(Some("Patient"), Some("123"), None, None)]
            )
        );
        // Any type name, where the parameter may refer to any type.
        assert_eq!(
            plain("Observation", "focus:Condition", "c1").0,
            Some(Modifier::Type("Condition".to_owned()))
        );
        assert_eq!(
            plain(
                "Observation",
                "subject:identifier",
                "http://hospital.org/mrn|123"
            ),
            (
                Some(Modifier::Identifier),
                vec![token(is("http://hospital.org/mrn"), Some("123"))]
            )
        );
        assert_eq!(
            plain("Observation", "subject:missing", "false"),
            (Some(Modifier::Missing), vec![QueryValue::Boolean(false)])
        );
        for (name, expected) in [
            ("subject:above", "not supported"),
            ("subject:below", "not supported"),
            ("subject:Specimen", "not a target type"),
            ("subject:exact", "does not apply to reference"),
            ("subject:patient", "does not apply to reference"),
        ] {
            let reason = ignored_reason(Some("Observation"), name, "123");
            assert!(reason.contains(expected), "{name}: {reason}");
        }
        assert_eq!(
            error_on("Observation", "subject:Patient", "Group/1"),
            QueryError::ReferenceTypeMismatch {
                parameter: "subject:Patient".to_owned()
            }
        );
        assert_eq!(
            error_on(
                "Observation",
                "subject:Patient",
                "http://example.org/fhir/Group/1"
            ),
            QueryError::ReferenceTypeMismatch {
                parameter: "subject:Patient".to_owned()
            }
        );
        for malformed in [
            "Patient/",
            "/123",
            "patient/123",
            "a/b/c",
            "Patient/123|1",
            "a|b|c",
            "|1.0",
            "http://example.org/fhir/Patient/1/_history/2|3",
        ] {
            assert!(
                matches!(
                    error_on("Observation", "subject", malformed),
                    QueryError::InvalidValue { ref expected, .. } if expected == "reference"
                ),
                "{malformed}"
            );
        }
    }

    #[test]
    fn date_values_take_every_prefix() {
        for (text, prefix) in [
            ("2013-01-14", Prefix::Eq),
            ("eq2013-01-14", Prefix::Eq),
            ("ne2013-01-14", Prefix::Ne),
            ("gt2013-01-14", Prefix::Gt),
            ("lt2013-01-14", Prefix::Lt),
            ("ge2013-01-14", Prefix::Ge),
            ("le2013-01-14", Prefix::Le),
            ("sa2013-01-14", Prefix::Sa),
            ("eb2013-01-14", Prefix::Eb),
            ("ap2013-01-14", Prefix::Ap),
        ] {
            assert_eq!(
                plain("Patient", "birthdate", text),
                (None, vec![date(prefix, "2013-01-14")]),
                "{text}"
            );
        }
        assert_eq!(
            plain("Observation", "date", "ge2013-01-14T10:00:00+01:00,lt2013"),
            (
                None,
                vec![
                    date(Prefix::Ge, "2013-01-14T10:00:00+01:00"),
                    date(Prefix::Lt, "2013")
                ]
            )
        );
        assert_eq!(
            plain("Observation", "_lastUpdated", "gt2020-01").1,
            vec![date(Prefix::Gt, "2020-01")]
        );
        for malformed in [
            "2013-13-01",
            "xx2013",
            "GE2013",
            "ge",
            "2013-01-14 10:00",
            "gtgt2013",
            "yesterday",
            "2013-02-30",
            "'; DROP TABLE x; --",
        ] {
            let error = error_on("Patient", "birthdate", malformed);
            assert_eq!(
                error.to_string(),
                "the value of birthdate is not a valid date",
                "{malformed}"
            );
        }
        let reason = ignored_reason(Some("Patient"), "birthdate:exact", "2013");
        assert!(reason.contains("does not apply to date"), "{reason}");
        assert_eq!(
            plain("Patient", "birthdate:missing", "true"),
            (Some(Modifier::Missing), vec![QueryValue::Boolean(true)])
        );
    }

    #[test]
    fn number_and_quantity_values() {
        let number = |prefix: Prefix, text: &str| {
            let (value, low, high) =
                values::parse_decimal_range(text).unwrap_or_else(|| panic!("{text}"));
            QueryValue::Number {
                prefix,
                value,
                low,
                high,
            }
        };
        for (text, expected) in [
            ("0.8", number(Prefix::Eq, "0.8")),
            ("gt0.8", number(Prefix::Gt, "0.8")),
            ("ap5.40", number(Prefix::Ap, "5.40")),
            ("le-1e2", number(Prefix::Le, "-1e2")),
            ("sa100", number(Prefix::Sa, "100")),
        ] {
            assert_eq!(
                plain("RiskAssessment", "probability", text),
                (None, vec![expected]),
                "{text}"
            );
        }
        let ucum = "http://unitsofmeasure.org";
        for (text, expected) in [
            ("5.4", quantity(Prefix::Eq, "5.4", None, None)),
            ("5.4||mg", quantity(Prefix::Eq, "5.4", None, Some("mg"))),
            (
                "5.4|http://unitsofmeasure.org|mg",
                quantity(Prefix::Eq, "5.4", Some(ucum), Some("mg")),
            ),
            (
                "lt5.4|http://unitsofmeasure.org|mg",
                quantity(Prefix::Lt, "5.4", Some(ucum), Some("mg")),
            ),
            (
                "ge120|http://unitsofmeasure.org|",
                quantity(Prefix::Ge, "120", Some(ucum), None),
            ),
            (
                r"1|s\|t|m\$g",
                quantity(Prefix::Eq, "1", Some("s|t"), Some("m$g")),
            ),
        ] {
            assert_eq!(
                plain("Observation", "value-quantity", text),
                (None, vec![expected]),
                "{text}"
            );
        }
        for malformed in ["abc", "five", "5;4", "gt", "0x10", "1e", "xx5", "NaN"] {
            let error = error_on("RiskAssessment", "probability", malformed);
            assert_eq!(
                error.to_string(),
                "the value of probability is not a valid number",
                "{malformed}"
            );
        }
        for malformed in ["5.4|mg", "abc||mg", "5.4|a|b|c", "||mg", "gt|x|y"] {
            assert!(
                matches!(
                    error_on("Observation", "value-quantity", malformed),
                    QueryError::InvalidValue { ref expected, .. } if expected == "quantity"
                ),
                "{malformed}"
            );
        }
        let reason = ignored_reason(Some("RiskAssessment"), "probability:exact", "1");
        assert!(reason.contains("does not apply to number"), "{reason}");
    }

    #[test]
    fn uri_values_and_modifiers() {
        let url = "http://example.org/fhir/ValueSet/vs";
        assert_eq!(
            plain("ValueSet", "url", url),
            (None, vec![QueryValue::Uri(url.to_owned())])
        );
        assert_eq!(
            plain("ValueSet", "url:below", "http://example.org/fhir/").0,
            Some(Modifier::Below)
        );
        assert_eq!(plain("ValueSet", "url:above", url).0, Some(Modifier::Above));
        assert_eq!(
            plain("ValueSet", "url:missing", "true").0,
            Some(Modifier::Missing)
        );
        let reason = ignored_reason(Some("ValueSet"), "url:contains", "x");
        assert!(reason.contains("does not apply to uri"), "{reason}");
    }

    #[test]
    fn composite_values_split_on_dollar() {
        let ucum = "http://unitsofmeasure.org";
        assert_eq!(
            plain(
                "Observation",
                "code-value-quantity",
                "http://loinc.org|8480-6$gt120|http://unitsofmeasure.org|mm[Hg],x$5"
            ),
            (
                None,
                vec![
                    QueryValue::Composite(vec![
                        token(is("http://loinc.org"), Some("8480-6")),
                        quantity(Prefix::Gt, "120", Some(ucum), Some("mm[Hg]")),
                    ]),
                    QueryValue::Composite(vec![
                        token(TokenSystem::Any, Some("x")),
                        quantity(Prefix::Eq, "5", None, None),
                    ]),
                ]
            )
        );
        assert_eq!(
            plain("Observation", "code-value-string", r"a\$b$c\$d\,e").1,
            vec![QueryValue::Composite(vec![
                token(TokenSystem::Any, Some("a$b")),
                string("c$d,e"),
            ])]
        );
        assert_eq!(
            error_on("Observation", "code-value-quantity", "a$1$2"),
            QueryError::ComponentCount {
                parameter: "code-value-quantity".to_owned(),
                expected: 2
            }
        );
        assert_eq!(
            error_on("Observation", "code-value-quantity", "a"),
            QueryError::ComponentCount {
                parameter: "code-value-quantity".to_owned(),
                expected: 2
            }
        );
        assert_eq!(
            error_on("Observation", "code-value-quantity", "a$heavy").to_string(),
            "the value of code-value-quantity is not a valid quantity in component 2"
        );
        for (value, expected) in [
            ("a$", "the value of code-value-string is not a valid string in component 2"),
            ("$b", "the value of code-value-string is not a valid token in component 1"),
            ("a$ ", "the value of code-value-string is not a valid search string (it is blank) in component 2"),
        ] {
            assert_eq!(
                error_on("Observation", "code-value-string", value).to_string(),
                expected
            );
        }
        let reason = ignored_reason(Some("Observation"), "broken-composite", "a$b");
        assert!(reason.contains("components"), "{reason}");
        assert_eq!(
            plain("Observation", "code-value-quantity:missing", "true").0,
            Some(Modifier::Missing)
        );
    }

    #[test]
    fn repeated_parameters_are_anded_and_empty_ones_dropped() {
        let parsed = parse_on(
            "Observation",
            &[
                ("date", "ge2013"),
                ("date", "lt2014"),
                ("code", ""),
                ("_format", "json"),
                ("_pretty", "true"),
            ],
        );
        assert_eq!(parsed.criteria.len(), 2);
        assert!(parsed.ignored.is_empty());
        assert_eq!(parsed.control, Control::default());
        for value in [",", "a,", ",a", "a,,b"] {
            assert_eq!(
                error_on("Patient", "name", value),
                QueryError::EmptyAlternative {
                    parameter: "name".to_owned()
                },
                "{value}"
            );
        }
    }

    #[test]
    fn unknown_and_unsupported_parameters_are_ignored() {
        let parsed = parse_on(
            "Patient",
            &[
                ("nickname", "x"),
                ("name", "Eve"),
                ("_offset", "10"),
                ("_contained", "true"),
                ("_containedType", "container"),
                ("_list", "l1"),
                ("_query", "q"),
                ("_filter", "name eq x"),
                ("_text", "cancer"),
                ("_content", "cancer"),
                ("_unknown", "1"),
            ],
        );
        assert_eq!(parsed.criteria.len(), 1);
        let ignored: Vec<(&str, &str)> = parsed
            .ignored
            .iter()
            .map(|i| (i.name.as_str(), i.reason.as_str()))
            .collect();
        assert_eq!(
            ignored,
            [
                ("nickname", "Patient has no search parameter nickname"),
                ("_offset", "_offset is not supported"),
                ("_contained", "_contained is not supported"),
                ("_containedType", "_containedType is not supported"),
                ("_list", "_list is not supported"),
                ("_query", "_query is not supported"),
                ("_filter", "_filter is not supported"),
                ("_text", "_text is not supported"),
                ("_content", "_content is not supported"),
                ("_unknown", "Patient has no search parameter _unknown"),
            ]
        );
        let reason = ignored_reason(Some("Location"), "near", "42|-71|10|km");
        assert!(reason.contains("special"), "{reason}");
    }

    #[test]
    fn system_level_search_knows_only_common_parameters() {
        let parsed = parse(
            None,
            &pairs(&[
                ("_id", "a1"),
                ("_lastUpdated", "ge2020"),
                ("_type", "Patient, Observation"),
                ("name", "x"),
            ]),
            &TestLookup,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(
            &parsed.criteria[..],
            [
                Criterion::Plain { resource_type: first, code: id, .. },
                Criterion::Plain { resource_type: second, .. },
            ] if first == SYSTEM_LEVEL_TYPE && second == SYSTEM_LEVEL_TYPE && id == "_id"
        ));
        assert_eq!(
            parsed.control.types,
            Some(vec!["Patient".to_owned(), "Observation".to_owned()])
        );
        assert_eq!(parsed.ignored.len(), 1);
        assert_eq!(
            parsed.ignored[0].reason,
            "name is not a search parameter of every resource type"
        );
        for types in ["patient", "Patient,", "Patient;DROP", "*"] {
            let error = parse(None, &pairs(&[("_type", types)]), &TestLookup);
            assert_eq!(
                error,
                Err(QueryError::InvalidValue {
                    parameter: "_type".to_owned(),
                    expected: "list of resource types".to_owned()
                }),
                "{types}"
            );
        }
        let reason = ignored_reason(Some("Patient"), "_type", "Patient");
        assert!(reason.contains("system-level"), "{reason}");
    }

    #[test]
    fn result_parameters() {
        let parsed = parse_on(
            "Observation",
            &[
                ("_count", "25"),
                (
                    "_sort",
                    "-date,code,_id,-_lastUpdated,nonsense,,code-value-quantity",
                ),
                ("_total", "accurate"),
                ("_summary", "count"),
                ("_elements", "id, status ,code"),
                ("_cursor", "opaque+token/="),
                ("_count", "5"),
                ("_count:exact", "5"),
            ],
        );
        let control = &parsed.control;
        assert_eq!(control.count, Some(25));
        assert_eq!(
            control.sort,
            [
                ("date".to_owned(), true),
                ("code".to_owned(), false),
                ("_id".to_owned(), false),
                ("_lastUpdated".to_owned(), true),
            ]
        );
        assert_eq!(control.total, Some(TotalMode::Accurate));
        assert_eq!(control.summary, Some(SummaryMode::Count));
        assert_eq!(
            control.elements,
            Some(vec![
                "id".to_owned(),
                "status".to_owned(),
                "code".to_owned()
            ])
        );
        assert_eq!(control.cursor.as_deref(), Some("opaque+token/="));
        let ignored: Vec<(&str, &str)> = parsed
            .ignored
            .iter()
            .map(|i| (i.name.as_str(), i.reason.as_str()))
            .collect();
        assert_eq!(
            ignored,
            [
                (
                    "_sort",
                    "a _sort key is not a search parameter of Observation"
                ),
                ("_sort", "_sort has an empty key"),
                (
                    "_sort",
                    "a _sort key is not a search parameter of Observation"
                ),
                (
                    "_count",
                    "_count is repeated; only its first occurrence is used"
                ),
                ("_count:exact", "_count takes no modifier"),
            ]
        );
        for (mode, expected) in [
            ("none", TotalMode::None),
            ("estimate", TotalMode::Estimate),
            ("accurate", TotalMode::Accurate),
        ] {
            assert_eq!(
                parse_on("Patient", &[("_total", mode)]).control.total,
                Some(expected)
            );
        }
        for (mode, expected) in [
            ("true", SummaryMode::True),
            ("text", SummaryMode::Text),
            ("data", SummaryMode::Data),
            ("count", SummaryMode::Count),
            ("false", SummaryMode::False),
        ] {
            assert_eq!(
                parse_on("Patient", &[("_summary", mode)]).control.summary,
                Some(expected)
            );
        }
        assert!(ignored_reason(Some("Patient"), "_total", "exact").contains("_total is"));
        assert!(ignored_reason(Some("Patient"), "_summary", "TRUE").contains("_summary is"));
        assert!(ignored_reason(Some("Patient"), "_elements", " , ").contains("no element"));
        assert_eq!(
            parse_on("Patient", &[("_count", "0")]).control.count,
            Some(0)
        );
        for count in ["-1", "abc", "1.5", "99999999999999999999999", " 5"] {
            assert_eq!(
                error_on("Patient", "_count", count).to_string(),
                "the value of _count is not a valid non-negative integer",
                "{count}"
            );
        }
    }

    #[test]
    fn includes_and_revincludes() {
        let include = |source: &str, code: &str, target: Option<&str>, iterate: bool| Include {
            source_type: source.to_owned(),
            code: code.to_owned(),
            target_type: target.map(str::to_owned),
            iterate,
        };
        let parsed = parse_on(
            "Observation",
            &[
                ("_include", "Observation:patient"),
                ("_include", "Observation:subject:Patient"),
                ("_include:iterate", "Patient:organization"),
                ("_include:recurse", "Organization:partof"),
                ("_include", "Observation:*"),
                ("_include", "*"),
                ("_revinclude", "Provenance:target"),
                ("_revinclude:iterate", "AuditEvent:entity:Observation"),
                ("_include", "Observation:code"),
                ("_include", "Observation:subject:Specimen"),
                ("_include", "Observation:nonsense"),
                ("_include", "garbage"),
                ("_include", "observation:subject"),
                ("_include", "Observation:subject:Patient:extra"),
                ("_include:reverse", "Observation:patient"),
                ("_revinclude", "*"),
            ],
        );
        assert_eq!(
            parsed.control.includes,
            [
                include("Observation", "patient", None, false),
                include("Observation", "subject", Some("Patient"), false),
                include("Patient", "organization", None, true),
                include("Organization", "partof", None, true),
                include("Observation", "*", None, false),
                include("Observation", "*", None, false),
            ]
        );
        assert_eq!(
            parsed.control.revincludes,
            [
                include("Provenance", "target", None, false),
                include("AuditEvent", "entity", Some("Observation"), true),
            ]
        );
        let reasons: Vec<&str> = parsed.ignored.iter().map(|i| i.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "code of Observation is not a reference parameter",
                "Specimen is not a target type of subject",
                "Observation has no search parameter nonsense",
                "_include takes Type:parameter or Type:parameter:Type",
                "_include takes Type:parameter or Type:parameter:Type",
                "_include takes Type:parameter or Type:parameter:Type",
                ":reverse does not apply to _include",
                "_revinclude=* needs a source type here: Type:*",
            ]
        );
        assert!(parsed.criteria.is_empty());
        let system = parse(None, &pairs(&[("_include", "*")]), &TestLookup)
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(system.control.includes.is_empty());
        assert_eq!(system.ignored.len(), 1);
    }

    #[test]
    fn chains_follow_references_on_their_targets() {
        let organization_name = Criterion::Plain {
            resource_type: "Organization".to_owned(),
            code: "name".to_owned(),
            search_type: SearchType::String,
            modifier: None,
            values: vec![string("Acme")],
        };
        assert_eq!(
            criterion("Observation", "subject:Patient.organization.name", "Acme"),
            Criterion::Chain {
                resource_type: "Observation".to_owned(),
                code: "subject".to_owned(),
                target_types: vec!["Patient".to_owned()],
                inner: Box::new(Criterion::Chain {
                    resource_type: "Patient".to_owned(),
                    code: "organization".to_owned(),
                    target_types: vec!["Organization".to_owned()],
                    inner: Box::new(organization_name.clone()),
                }),
            }
        );
        // Without a type modifier, every target type that has the parameter.
        let Criterion::Chain {
            target_types,
            inner,
            ..
        } = criterion("Observation", "subject.name:exact", "Eve")
        else {
            panic!("not a chain");
        };
        assert_eq!(target_types, ["Patient", "Location"]);
        assert_eq!(
            *inner,
            Criterion::Plain {
                resource_type: "Patient".to_owned(),
                code: "name".to_owned(),
                search_type: SearchType::String,
                modifier: Some(Modifier::Exact),
                values: vec![string("Eve")],
            }
        );
        let Criterion::Chain { target_types, .. } =
            criterion("Observation", "performer.name", "Eve")
        else {
            panic!("not a chain");
        };
        assert_eq!(target_types, ["Practitioner", "Organization", "Patient"]);
        // Three levels are the most.
        assert!(matches!(
            criterion(
                "Observation",
                "subject:Patient.organization.partof.name",
                "Acme"
            ),
            Criterion::Chain { .. }
        ));
        for (name, expected) in [
            (
                "subject:Patient.organization.partof.partof.name",
                "nest at most 3 levels",
            ),
            ("subject.nonsense", "none of the target types of subject"),
            (
                "subject:Patient.nonsense",
                "Patient has no search parameter nonsense",
            ),
            ("code.name", "not a reference parameter"),
            ("focus.name", "may refer to any resource type"),
            ("subject:Specimen.name", "not a target type of subject"),
            ("subject:missing.name", "only a type modifier"),
            (
                "nonsense.name",
                "Observation has no search parameter nonsense",
            ),
        ] {
            let reason = ignored_reason(Some("Observation"), name, "x");
            assert!(reason.contains(expected), "{name}: {reason}");
        }
        assert!(matches!(
            criterion("Observation", "focus:Patient.name", "Eve"),
            Criterion::Chain { ref target_types, .. } if target_types == &["Patient"]
        ));
        assert_eq!(
            error_on("Observation", "subject.birthdate", "not-a-date").to_string(),
            "the value of subject.birthdate is not a valid date"
        );
        // A chain into _has.
        assert!(matches!(
            criterion("Observation", "subject:Patient._has:Encounter:patient:_id", "e1"),
            Criterion::Chain { ref inner, .. } if matches!(**inner, Criterion::Has { .. })
        ));
    }

    #[test]
    fn has_selects_by_reverse_references() {
        let code = Criterion::Plain {
            resource_type: "Observation".to_owned(),
            code: "code".to_owned(),
            search_type: SearchType::Token,
            modifier: None,
            values: vec![token(TokenSystem::Any, Some("1234-5"))],
        };
        assert_eq!(
            criterion("Patient", "_has:Observation:patient:code", "1234-5"),
            Criterion::Has {
                resource_type: "Patient".to_owned(),
                source_type: "Observation".to_owned(),
                reference_code: "patient".to_owned(),
                inner: Box::new(code),
            }
        );
        assert_eq!(
            criterion(
                "Patient",
                "_has:Observation:patient:_has:AuditEvent:entity:_id",
                "a1"
            ),
            Criterion::Has {
                resource_type: "Patient".to_owned(),
                source_type: "Observation".to_owned(),
                reference_code: "patient".to_owned(),
                inner: Box::new(Criterion::Has {
                    resource_type: "Observation".to_owned(),
                    source_type: "AuditEvent".to_owned(),
                    reference_code: "entity".to_owned(),
                    inner: Box::new(Criterion::Plain {
                        resource_type: "AuditEvent".to_owned(),
                        code: "_id".to_owned(),
                        search_type: SearchType::Token,
                        modifier: None,
                        values: vec![token(TokenSystem::Any, Some("a1"))],
                    }),
                }),
            }
        );
        // Three levels are the most.
        assert!(matches!(
            criterion(
                "Patient",
                "_has:Observation:patient:_has:AuditEvent:entity:_has:AuditEvent:entity:_id",
                "a1"
            ),
            Criterion::Has { .. }
        ));
        assert!(matches!(
            criterion("Patient", "_has:Observation:patient:code:text", "weight"),
            Criterion::Has { ref inner, .. } if matches!(
                **inner,
                Criterion::Plain { modifier: Some(Modifier::Text), .. }
            )
        ));
        assert!(matches!(
            criterion("Patient", "_has:Observation:subject:performer:Practitioner.name", "x"),
            Criterion::Has { ref inner, .. } if matches!(**inner, Criterion::Chain { .. })
        ));
        for (resource_type, name, expected) in [
            (
                "Patient",
                "_has:Observation:code:code",
                "not a reference parameter",
            ),
            (
                "Organization",
                "_has:Observation:patient:code",
                "does not refer to Organization",
            ),
            (
                "Patient",
                "_has:Observation:nonsense:code",
                "has no search parameter nonsense",
            ),
            ("Patient", "_has:Observation:patient", "_has takes the form"),
            (
                "Patient",
                "_has:observation:patient:code",
                "_has takes the form",
            ),
            ("Patient", "_has:Observation::code", "_has takes the form"),
            (
                "Patient",
                "_has:Observation:patient:nonsense",
                "no search parameter nonsense",
            ),
            (
                "Patient",
                "_has:Observation:patient:_has:AuditEvent:entity:_has:AuditEvent:entity:\
                 _has:AuditEvent:entity:_id",
                "nest at most 3 levels",
            ),
        ] {
            let reason = ignored_reason(Some(resource_type), name, "x");
            assert!(reason.contains(expected), "{name}: {reason}");
        }
        assert_eq!(
            error_on("Patient", "_has:Observation:patient:date", "bad").to_string(),
            "the value of _has:Observation:patient:date is not a valid date"
        );
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let fragments = [
            "",
            ":",
            ".",
            "_has:",
            "\\",
            "|",
            "$",
            ",",
            "é",
            "日",
            "subject",
            "Patient",
            "name",
            "code",
            "gt",
            "2013",
            "-",
            "*",
            "iterate",
            "1e2",
            "/",
            "http://",
            "_history",
            "\u{301}",
            "Observation",
        ];
        let mut texts = Vec::new();
        for first in fragments {
            for second in fragments {
                for third in fragments {
                    texts.push(format!("{first}{second}{third}"));
                }
            }
        }
        for text in &texts {
            let _ = split_escaped(text, ',');
            for (name, value) in [
                (text.as_str(), text.as_str()),
                (text.as_str(), "x"),
                ("subject", text.as_str()),
                ("subject:Patient", text.as_str()),
                ("subject:identifier", text.as_str()),
                ("code", text.as_str()),
                ("code:of-type", text.as_str()),
                ("date", text.as_str()),
                ("value-quantity", text.as_str()),
                ("code-value-quantity", text.as_str()),
                ("subject.name", text.as_str()),
                ("_include", text.as_str()),
                ("_sort", text.as_str()),
                ("_count", text.as_str()),
            ] {
                let query = pairs(&[(name, value)]);
                let _ = parse(Some("Observation"), &query, &TestLookup);
                let _ = parse(None, &query, &TestLookup);
            }
        }
    }

    #[test]
    fn error_messages_never_repeat_values() {
        let secret = "1962-99-99Jane'Doe";
        for (resource_type, name) in [
            ("Patient", "birthdate"),
            ("RiskAssessment", "probability"),
            ("Observation", "value-quantity"),
            ("Observation", "code-value-quantity"),
            ("Observation", "subject.birthdate"),
            ("Patient", "name:missing"),
            ("Patient", "identifier:of-type"),
            ("Patient", "_count"),
        ] {
            let message = error_on(resource_type, name, secret).to_string();
            assert!(message.contains(name), "{message}");
            assert!(!message.contains("1962"), "{message}");
            assert!(!message.contains("Jane"), "{message}");
        }
        for value in ["Jane|Doe|x", "Patient/Jane|x"] {
            let message = error_on("Observation", "subject", value).to_string();
            assert!(!message.contains("Jane"), "{message}");
        }
    }
}
