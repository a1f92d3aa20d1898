//! FHIRPath, reduced to what the FHIR R4 SearchParameter expressions use
//! (<http://hl7.org/fhirpath/N1/>, <http://hl7.org/fhir/R4/searchparameter-registry.html>).
//!
//! An [`Expression`] is parsed once, when the search-parameter registry loads, and evaluated
//! against many resources: evaluation walks the parsed tree over `serde_json` values without
//! copying them, and uses no regular expression.
//!
//! # What is supported
//! Every construct that occurs in an R4 SearchParameter `expression` or `component.expression`:
//! - paths from a type name (`Patient.name.given`; `Resource` and `DomainResource` match any
//!   resource they cover) or from the focus (`value.as(Quantity)` in a composite component);
//! - choice elements: `Observation.value` finds `valueQuantity`, `valueString`, ... and records
//!   the FHIR type (`Quantity`, `string`) as the node's [`Node::type_hint`];
//! - `|` (union, without removing duplicates), parentheses, the indexer `[n]`;
//! - `as`, `is` (operators and functions) and `ofType()`, which see FHIR's type hierarchy
//!   (`Age` is a `Quantity`, `code` is a `string`, `url` is a `uri`) and ignore the case of
//!   type names (`System.DateTime` and FHIR `dateTime` are the same here; R4 itself writes
//!   `value.as(DateTime)` once);
//! - `=` and `!=`, `and`, `or`, `xor`, `implies` (three-valued, as FHIRPath defines them);
//! - `where()`, `exists()`, `empty()`, `not()`, `first()`, `last()`, `resolve()`,
//!   `extension('url')`;
//! - string, number and boolean literals, `{}`, `$this`, `%resource`, `%rootResource`,
//!   `%context`, `%ucum`, `%sct`, `%loinc`.
//!
//! Anything else (arithmetic, ordering comparisons, `in`/`contains`, other functions) is a
//! [`ParseError`], so an unsupported custom SearchParameter is refused when it is loaded rather
//! than silently matching nothing.
//!
//! # Deliberate simplifications
//! - `resolve()` does not fetch anything. On a contained reference (`#id`) it yields the
//!   contained resource; on any other reference it yields a placeholder that knows only the
//!   target's type (from `Patient/1`, `http://x/fhir/Patient/1` or `Reference.type`), which is
//!   all `resolve() is Patient` needs. Placeholders never appear in [`Expression::evaluate`]'s
//!   result.
//! - Type operators apply to whole collections (`(Observation.component.value as Quantity)`
//!   filters instead of failing on several items), as the R4 expressions assume.
//! - Primitive extensions (`_birthDate`) are not navigated.

use std::fmt;

use serde_json::{Map, Value};

/// The longest expression accepted, in tokens; the longest R4 expression has about 330.
const MAX_TOKENS: usize = 1024;

/// Deepest nesting of parentheses and function arguments: the parser recurses on them.
const MAX_NESTING: usize = 64;

/// Deepest parsed tree accepted; R4's deepest is 5. Evaluation recurses on the tree, so this
/// is what keeps a hostile custom SearchParameter (`a = b = c = ...`) from exhausting a
/// thread's stack.
const MAX_DEPTH: usize = 64;

/// A boolean produced by the expression itself (`exists()`, `and`, ...), given a place to live
/// so that it can be returned as a [`Node`] like the resource's own elements.
static TRUE_VALUE: Value = Value::Bool(true);
static FALSE_VALUE: Value = Value::Bool(false);

/// Choice-element suffixes (`value[x]` stored as `valueDateTime`) and the FHIR type each names:
/// every type R4 allows in a choice element. Primitive types start lowercase, as FHIR spells them.
const CHOICE_TYPES: &[(&str, &str)] = &[
    ("Base64Binary", "base64Binary"),
    ("Boolean", "boolean"),
    ("Canonical", "canonical"),
    ("Code", "code"),
    ("Date", "date"),
    ("DateTime", "dateTime"),
    ("Decimal", "decimal"),
    ("Id", "id"),
    ("Instant", "instant"),
    ("Integer", "integer"),
    ("Markdown", "markdown"),
    ("Oid", "oid"),
    ("PositiveInt", "positiveInt"),
    ("String", "string"),
    ("Time", "time"),
    ("UnsignedInt", "unsignedInt"),
    ("Uri", "uri"),
    ("Url", "url"),
    ("Uuid", "uuid"),
    ("Address", "Address"),
    ("Age", "Age"),
    ("Annotation", "Annotation"),
    ("Attachment", "Attachment"),
    ("CodeableConcept", "CodeableConcept"),
    ("Coding", "Coding"),
    ("ContactDetail", "ContactDetail"),
    ("ContactPoint", "ContactPoint"),
    ("Contributor", "Contributor"),
    ("Count", "Count"),
    ("DataRequirement", "DataRequirement"),
    ("Distance", "Distance"),
    ("Dosage", "Dosage"),
    ("Duration", "Duration"),
    ("Expression", "Expression"),
    ("HumanName", "HumanName"),
    ("Identifier", "Identifier"),
    ("Meta", "Meta"),
    ("Money", "Money"),
    ("ParameterDefinition", "ParameterDefinition"),
    ("Period", "Period"),
    ("Quantity", "Quantity"),
    ("Range", "Range"),
    ("Ratio", "Ratio"),
    ("Reference", "Reference"),
    ("RelatedArtifact", "RelatedArtifact"),
    ("SampledData", "SampledData"),
    ("Signature", "Signature"),
    ("Timing", "Timing"),
    ("TriggerDefinition", "TriggerDefinition"),
    ("UsageContext", "UsageContext"),
];

/// R4 elements whose names look like a choice variant of a sibling but are elements of their
/// own (`Coverage.subscriberId` beside `Coverage.subscriber`, `Encounter.reasonCode`, ...): the
/// complete list from the R4 definitions. Without it, `Coverage.subscriber` on a Coverage that
/// has only `subscriberId` would wrongly yield the id.
const NOT_CHOICE_VARIANTS: &[&str] = &[
    "cTerminalModificationId",
    "conclusionCode",
    "dataPeriod",
    "formCode",
    "instantiatesCanonical",
    "instantiatesUri",
    "languageCode",
    "nTerminalModificationId",
    "organismId",
    "paymentDate",
    "preAuthRefPeriod",
    "reasonCode",
    "reasonReference",
    "responseCode",
    "sequenceAttachment",
    "sourceId",
    "statusDate",
    "subscriberId",
    "typeReference",
];

/// One item of an evaluation's result: an element of the resource (or, for `exists()` and
/// the logical operators, a boolean).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node<'a> {
    /// The element's JSON. Never an array: FHIRPath collections are flattened, so each array
    /// member is a node of its own.
    pub value: &'a Value,
    /// The element's FHIR type when the evaluation knows it: the type of a choice element
    /// (`Quantity` for `valueQuantity`, `dateTime` for `effectiveDateTime`), the `resourceType`
    /// of a resource, `boolean` for a computed boolean. `None` for ordinary elements, whose
    /// type the JSON alone does not tell.
    pub type_hint: Option<&'a str>,
}

/// A parsed FHIRPath expression. Parse once with [`Expression::parse`], evaluate many times.
#[derive(Debug, Clone)]
pub struct Expression {
    root: Expr,
}

/// Why an expression could not be parsed. Offsets are byte offsets into the expression text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// A character that starts no FHIRPath token.
    #[error("unexpected character {found:?} at offset {position}")]
    UnexpectedCharacter { position: usize, found: char },
    /// A string, delimited identifier or comment that is not closed.
    #[error("unterminated {what} starting at offset {position}")]
    Unterminated { position: usize, what: &'static str },
    /// A backslash escape that FHIRPath does not define.
    #[error("invalid escape sequence at offset {position}")]
    InvalidEscape { position: usize },
    /// A number literal that is not a finite number.
    #[error("invalid number {text:?} at offset {position}")]
    InvalidNumber { position: usize, text: String },
    /// The grammar wanted something else here.
    #[error("expected {expected} at offset {position}, found {found}")]
    Unexpected {
        position: usize,
        expected: &'static str,
        found: String,
    },
    /// Valid FHIRPath that this evaluator does not implement (see the module documentation).
    #[error("unsupported {what} `{name}` at offset {position}")]
    Unsupported {
        position: usize,
        what: &'static str,
        name: String,
    },
    /// A supported function called with the wrong number or kind of arguments.
    #[error("{name}() at offset {position} takes {expected}")]
    WrongArguments {
        position: usize,
        name: String,
        expected: &'static str,
    },
    /// Parentheses or function calls nested deeper than the parser allows.
    #[error("nesting deeper than {MAX_NESTING} levels at offset {position}")]
    TooDeep { position: usize },
    /// Operators chained into a tree deeper than evaluation allows.
    #[error("expression nested deeper than {MAX_DEPTH} operators")]
    TooComplex,
    /// More tokens than the parser allows.
    #[error("expression longer than {MAX_TOKENS} tokens")]
    TooLong,
}

/// The parsed tree.
#[derive(Debug, Clone)]
enum Expr {
    /// `$this`, and the implicit focus of a function called without a target.
    This,
    /// `%resource` / `%rootResource`: the resource being evaluated.
    Resource,
    /// `%context`: the focus the evaluation started from.
    Context,
    Literal(Literal),
    /// `{}`.
    Empty,
    /// An identifier that starts a path: a type name when capitalised (`Patient`), otherwise a
    /// member of the focus (`value` in a component expression).
    Identifier(String),
    /// A term followed by member accesses, indexers and function calls. Kept as a list, not
    /// nested, so that long paths make a flat tree.
    Path(Box<Expr>, Vec<Step>),
    /// `a | b | c`, flat for the same reason.
    Union(Vec<Expr>),
    Equality {
        left: Box<Expr>,
        right: Box<Expr>,
        negated: bool,
    },
    Logic(LogicOperator, Box<Expr>, Box<Expr>),
    /// `x is Type`.
    TypeTest(Box<Expr>, String),
    /// `x as Type`.
    TypeCast(Box<Expr>, String),
}

impl Expr {
    /// The depth of the tree, found without recursion: the tree is not yet known to be shallow.
    fn depth(&self) -> usize {
        let mut deepest = 0;
        let mut pending = vec![(self, 1)];
        while let Some((expr, depth)) = pending.pop() {
            deepest = deepest.max(depth);
            pending.extend(expr.children().into_iter().map(|child| (child, depth + 1)));
        }
        deepest
    }

    fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::This
            | Expr::Resource
            | Expr::Context
            | Expr::Literal(_)
            | Expr::Empty
            | Expr::Identifier(_) => Vec::new(),
            Expr::Path(start, steps) => std::iter::once(&**start)
                .chain(steps.iter().filter_map(|step| match step {
                    Step::Index(index) => Some(index),
                    Step::Call(Function::Where(criteria) | Function::Exists(Some(criteria))) => {
                        Some(&**criteria)
                    }
                    Step::Member(_) | Step::Call(_) => None,
                }))
                .collect(),
            Expr::Union(operands) => operands.iter().collect(),
            Expr::Equality { left, right, .. } | Expr::Logic(_, left, right) => vec![left, right],
            Expr::TypeTest(operand, _) | Expr::TypeCast(operand, _) => vec![operand],
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Member(String),
    Index(Expr),
    Call(Function),
}

#[derive(Debug, Clone)]
enum Literal {
    Text(String),
    Number(f64),
    Boolean(bool),
}

#[derive(Debug, Clone, Copy)]
enum LogicOperator {
    And,
    Or,
    Xor,
    Implies,
}

#[derive(Debug, Clone)]
enum Function {
    Where(Box<Expr>),
    Exists(Option<Box<Expr>>),
    Empty,
    Not,
    First,
    Last,
    /// `ofType(T)` and `as(T)`: both keep the items of type T.
    OfType(String),
    Is(String),
    Resolve,
    Extension(String),
}

impl Expression {
    /// Parses FHIRPath text.
    ///
    /// # Errors
    /// [`ParseError`] when the text is not FHIRPath, or uses a construct outside the supported
    /// subset; the error says what and at which byte offset.
    pub fn parse(text: &str) -> Result<Expression, ParseError> {
        let tokens = tokenize(text)?;
        if tokens.len() > MAX_TOKENS {
            return Err(ParseError::TooLong);
        }
        let mut parser = Parser {
            tokens,
            next: 0,
            nesting: 0,
        };
        let root = parser.expression()?;
        let trailing = parser.peek();
        if trailing.kind != TokenKind::End {
            return Err(unexpected(
                trailing,
                "an operator or the end of the expression",
            ));
        }
        if root.depth() > MAX_DEPTH {
            return Err(ParseError::TooComplex);
        }
        Ok(Expression { root })
    }

    /// Evaluates against a resource (a FHIR R4 resource in JSON form) and returns the matching
    /// nodes. A leading type name that the resource's `resourceType` does not match yields
    /// nothing. Literals that end up in the result (as in `'a' | Patient.id`) are dropped: a
    /// search index only wants the resource's own elements and computed booleans.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let root = Node {
            value: resource,
            type_hint: resource.get("resourceType").and_then(Value::as_str),
        };
        self.evaluate_from(resource, &[root])
    }

    /// Evaluates with `focus` as the starting collection and `resource` as `%resource`; used
    /// for the relative component expressions of composite parameters (`value.as(Quantity)`
    /// evaluated on each `Observation.component`).
    pub fn evaluate_from<'a>(&self, resource: &'a Value, focus: &[Node<'a>]) -> Vec<Node<'a>> {
        let start: Vec<Item<'a, '_>> = focus.iter().copied().map(Item::Node).collect();
        let evaluator = Evaluator {
            resource,
            context: &start,
        };
        evaluator
            .eval(&self.root, &start)
            .into_iter()
            .filter_map(Item::into_node)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    /// A plain identifier; it may be a keyword (`and`, `as`, `true`) where the grammar says so.
    Identifier(String),
    /// A backtick-delimited identifier, never a keyword.
    DelimitedIdentifier(String),
    Text(String),
    Number(String),
    /// `$this` and friends, without the `$`.
    Special(String),
    /// `%resource` and friends, without the `%`.
    Environment(String),
    Symbol(&'static str),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    position: usize,
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenKind::Identifier(name) | TokenKind::DelimitedIdentifier(name) => {
                write!(f, "`{name}`")
            }
            TokenKind::Text(text) => write!(f, "'{text}'"),
            TokenKind::Number(text) => write!(f, "{text}"),
            TokenKind::Special(name) => write!(f, "${name}"),
            TokenKind::Environment(name) => write!(f, "%{name}"),
            TokenKind::Symbol(symbol) => write!(f, "`{symbol}`"),
            TokenKind::End => write!(f, "the end of the expression"),
        }
    }
}

/// Two-character symbols first, so that `!=` is not read as `!` then `=`.
const SYMBOLS: &[&str] = &[
    "!=", "!~", "<=", ">=", ".", "(", ")", "[", "]", "{", "}", ",", "|", "=", "~", "<", ">", "+",
    "-", "*", "/", "&",
];

fn tokenize(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut scanner = Scanner { text, position: 0 };
    loop {
        scanner.skip_whitespace_and_comments()?;
        let position = scanner.position;
        let Some(current) = scanner.peek() else {
            tokens.push(Token {
                kind: TokenKind::End,
                position,
            });
            return Ok(tokens);
        };
        let kind = if current == '\'' {
            TokenKind::Text(scanner.quoted('\'', "string")?)
        } else if current == '`' {
            TokenKind::DelimitedIdentifier(scanner.quoted('`', "delimited identifier")?)
        } else if current.is_ascii_digit() {
            TokenKind::Number(scanner.number())
        } else if is_identifier_start(current) {
            TokenKind::Identifier(scanner.identifier())
        } else if current == '$' {
            scanner.position += 1;
            match scanner.peek() {
                Some(c) if is_identifier_start(c) => TokenKind::Special(scanner.identifier()),
                _ => {
                    return Err(ParseError::UnexpectedCharacter {
                        position,
                        found: '$',
                    })
                }
            }
        } else if current == '%' {
            scanner.position += 1;
            match scanner.peek() {
                Some(c) if is_identifier_start(c) => TokenKind::Environment(scanner.identifier()),
                Some('`') => TokenKind::Environment(scanner.quoted('`', "delimited identifier")?),
                Some('\'') => TokenKind::Environment(scanner.quoted('\'', "string")?),
                _ => {
                    return Err(ParseError::UnexpectedCharacter {
                        position,
                        found: '%',
                    })
                }
            }
        } else if let Some(symbol) = SYMBOLS
            .iter()
            .find(|symbol| scanner.rest().starts_with(**symbol))
        {
            scanner.position += symbol.len();
            TokenKind::Symbol(symbol)
        } else {
            return Err(ParseError::UnexpectedCharacter {
                position,
                found: current,
            });
        };
        tokens.push(Token { kind, position });
    }
}

fn is_identifier_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_identifier_part(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

struct Scanner<'t> {
    text: &'t str,
    /// Byte offset of the next character; always on a character boundary.
    position: usize,
}

impl<'t> Scanner<'t> {
    fn rest(&self) -> &'t str {
        self.text.get(self.position..).unwrap_or("")
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_whitespace_and_comments(&mut self) -> Result<(), ParseError> {
        loop {
            let rest = self.rest();
            let trimmed = rest.trim_start();
            self.position += rest.len() - trimmed.len();
            if trimmed.starts_with("//") {
                let line_length = trimmed.find('\n').unwrap_or(trimmed.len());
                self.position += line_length;
            } else if let Some(body) = trimmed.strip_prefix("/*") {
                let Some(end) = body.find("*/") else {
                    return Err(ParseError::Unterminated {
                        position: self.position,
                        what: "comment",
                    });
                };
                self.position += 2 + end + 2;
            } else {
                return Ok(());
            }
        }
    }

    fn identifier(&mut self) -> String {
        let rest = self.rest();
        let length = rest
            .find(|c: char| !is_identifier_part(c))
            .unwrap_or(rest.len());
        self.position += length;
        rest[..length].to_owned()
    }

    /// Digits, then a fraction only when a digit follows the dot (`1.first()` stays a call).
    fn number(&mut self) -> String {
        let rest = self.rest();
        let bytes = rest.as_bytes();
        let mut length = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        if bytes.get(length) == Some(&b'.') && bytes.get(length + 1).is_some_and(u8::is_ascii_digit)
        {
            length += 1;
            length += bytes[length..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
        }
        self.position += length;
        rest[..length].to_owned()
    }

    /// A string or delimited identifier, with FHIRPath's escapes resolved.
    fn quoted(&mut self, quote: char, what: &'static str) -> Result<String, ParseError> {
        let start = self.position;
        self.position += quote.len_utf8();
        let mut content = String::new();
        loop {
            let Some(current) = self.peek() else {
                return Err(ParseError::Unterminated {
                    position: start,
                    what,
                });
            };
            let escape_position = self.position;
            self.position += current.len_utf8();
            if current == quote {
                return Ok(content);
            }
            if current != '\\' {
                content.push(current);
                continue;
            }
            let invalid = ParseError::InvalidEscape {
                position: escape_position,
            };
            let escaped = self.peek().ok_or(invalid.clone())?;
            self.position += escaped.len_utf8();
            let resolved = match escaped {
                '\'' | '"' | '`' | '\\' | '/' => escaped,
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'u' => {
                    let hex = self.rest().get(..4).ok_or(invalid.clone())?;
                    let code = u32::from_str_radix(hex, 16).map_err(|_| invalid.clone())?;
                    self.position += 4;
                    char::from_u32(code).ok_or(invalid)?
                }
                _ => return Err(invalid),
            };
            content.push(resolved);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parser: one function per FHIRPath precedence level, loosest first.
// ---------------------------------------------------------------------------------------------

struct Parser {
    tokens: Vec<Token>,
    next: usize,
    nesting: usize,
}

fn unexpected(token: &Token, expected: &'static str) -> ParseError {
    ParseError::Unexpected {
        position: token.position,
        expected,
        found: token.kind.to_string(),
    }
}

fn unsupported(token: &Token, what: &'static str, name: &str) -> ParseError {
    ParseError::Unsupported {
        position: token.position,
        what,
        name: name.to_owned(),
    }
}

/// The end token that the tokenizer always appends; used if the parser ever looks past it.
static END_TOKEN: Token = Token {
    kind: TokenKind::End,
    position: 0,
};

impl Parser {
    fn peek(&self) -> &Token {
        self.tokens
            .get(self.next)
            .or_else(|| self.tokens.last())
            .unwrap_or(&END_TOKEN)
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if self.next < self.tokens.len() {
            self.next += 1;
        }
        token
    }

    fn at_symbol(&self, symbol: &str) -> bool {
        matches!(&self.peek().kind, TokenKind::Symbol(s) if *s == symbol)
    }

    /// A keyword operator such as `and`: only a plain identifier counts.
    fn at_word(&self, word: &str) -> bool {
        matches!(&self.peek().kind, TokenKind::Identifier(name) if name == word)
    }

    fn expect_symbol(
        &mut self,
        symbol: &'static str,
        expected: &'static str,
    ) -> Result<(), ParseError> {
        if self.at_symbol(symbol) {
            self.advance();
            Ok(())
        } else {
            Err(unexpected(self.peek(), expected))
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(ParseError::TooDeep {
                position: self.peek().position,
            });
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.nesting = self.nesting.saturating_sub(1);
    }

    fn expression(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.or_expression()?;
        while self.at_word("implies") {
            self.advance();
            let right = self.or_expression()?;
            left = Expr::Logic(LogicOperator::Implies, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn or_expression(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and_expression()?;
        loop {
            let operator = if self.at_word("or") {
                LogicOperator::Or
            } else if self.at_word("xor") {
                LogicOperator::Xor
            } else {
                return Ok(left);
            };
            self.advance();
            let right = self.and_expression()?;
            left = Expr::Logic(operator, Box::new(left), Box::new(right));
        }
    }

    fn and_expression(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.membership_expression()?;
        while self.at_word("and") {
            self.advance();
            let right = self.membership_expression()?;
            left = Expr::Logic(LogicOperator::And, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// `in` and `contains` sit at this level; neither is supported.
    fn membership_expression(&mut self) -> Result<Expr, ParseError> {
        let left = self.equality_expression()?;
        let token = self.peek();
        match &token.kind {
            TokenKind::Identifier(word) if word == "in" || word == "contains" => {
                Err(unsupported(token, "operator", word))
            }
            _ => Ok(left),
        }
    }

    fn equality_expression(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.union_expression()?;
        loop {
            let negated = if self.at_symbol("=") {
                false
            } else if self.at_symbol("!=") {
                true
            } else {
                return Ok(left);
            };
            self.advance();
            let right = self.union_expression()?;
            left = Expr::Equality {
                left: Box::new(left),
                right: Box::new(right),
                negated,
            };
        }
    }

    fn union_expression(&mut self) -> Result<Expr, ParseError> {
        let first = self.type_expression()?;
        let mut operands = Vec::new();
        while self.at_symbol("|") {
            self.advance();
            operands.push(self.type_expression()?);
        }
        let token = self.peek();
        if let TokenKind::Symbol(symbol @ ("~" | "!~" | "<" | ">" | "<=" | ">=")) = token.kind {
            return Err(unsupported(token, "operator", symbol));
        }
        if operands.is_empty() {
            return Ok(first);
        }
        operands.insert(0, first);
        Ok(Expr::Union(operands))
    }

    fn type_expression(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.postfix_expression()?;
        loop {
            let token = self.peek();
            match &token.kind {
                TokenKind::Symbol(symbol @ ("+" | "-" | "*" | "/" | "&")) => {
                    return Err(unsupported(token, "operator", symbol));
                }
                TokenKind::Identifier(word) if word == "div" || word == "mod" => {
                    return Err(unsupported(token, "operator", word));
                }
                TokenKind::Identifier(word) if word == "is" || word == "as" => {
                    let is_test = word == "is";
                    self.advance();
                    let type_name = self.type_specifier()?;
                    left = if is_test {
                        Expr::TypeTest(Box::new(left), type_name)
                    } else {
                        Expr::TypeCast(Box::new(left), type_name)
                    };
                }
                _ => return Ok(left),
            }
        }
    }

    /// `Quantity`, `FHIR.Quantity` or `System.String`; the namespace is dropped because type
    /// names are compared without regard to it (see the module documentation).
    fn type_specifier(&mut self) -> Result<String, ParseError> {
        let token = self.advance();
        let name = match token.kind {
            TokenKind::Identifier(name) | TokenKind::DelimitedIdentifier(name) => name,
            _ => return Err(unexpected(&token, "a type name")),
        };
        if (name == "FHIR" || name == "System") && self.at_symbol(".") {
            self.advance();
            let qualified = self.advance();
            return match qualified.kind {
                TokenKind::Identifier(name) | TokenKind::DelimitedIdentifier(name) => Ok(name),
                _ => Err(unexpected(&qualified, "a type name")),
            };
        }
        Ok(name)
    }

    fn postfix_expression(&mut self) -> Result<Expr, ParseError> {
        let start = self.term()?;
        let mut steps = Vec::new();
        loop {
            if self.at_symbol(".") {
                self.advance();
                let token = self.advance();
                let name = match token.kind {
                    TokenKind::Identifier(name) | TokenKind::DelimitedIdentifier(name) => name,
                    _ => return Err(unexpected(&token, "an element or function name")),
                };
                steps.push(if self.at_symbol("(") {
                    Step::Call(self.function_call(name, token.position)?)
                } else {
                    Step::Member(name)
                });
            } else if self.at_symbol("[") {
                self.advance();
                self.enter()?;
                let index = self.expression()?;
                self.leave();
                self.expect_symbol("]", "`]`")?;
                steps.push(Step::Index(index));
            } else if steps.is_empty() {
                return Ok(start);
            } else {
                return Ok(Expr::Path(Box::new(start), steps));
            }
        }
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        let token = self.advance();
        match token.kind {
            TokenKind::Symbol("(") => {
                self.enter()?;
                let inner = self.expression()?;
                self.leave();
                self.expect_symbol(")", "`)`")?;
                Ok(inner)
            }
            TokenKind::Symbol("{") => {
                self.expect_symbol("}", "`}`")?;
                Ok(Expr::Empty)
            }
            TokenKind::Text(text) => Ok(Expr::Literal(Literal::Text(text))),
            TokenKind::Number(text) => match text.parse::<f64>() {
                Ok(number) if number.is_finite() => Ok(Expr::Literal(Literal::Number(number))),
                _ => Err(ParseError::InvalidNumber {
                    position: token.position,
                    text,
                }),
            },
            TokenKind::Special(name) if name == "this" => Ok(Expr::This),
            TokenKind::Special(ref name) => {
                Err(unsupported(&token, "variable", &format!("${name}")))
            }
            TokenKind::Environment(ref name) => match name.as_str() {
                "resource" | "rootResource" => Ok(Expr::Resource),
                "context" => Ok(Expr::Context),
                "ucum" => Ok(text_literal("http://unitsofmeasure.org")),
                "sct" => Ok(text_literal("http://snomed.info/sct")),
                "loinc" => Ok(text_literal("http://loinc.org")),
                _ => Err(unsupported(&token, "variable", &format!("%{name}"))),
            },
            TokenKind::Identifier(name) if name == "true" || name == "false" => {
                Ok(Expr::Literal(Literal::Boolean(name == "true")))
            }
            TokenKind::Identifier(name) | TokenKind::DelimitedIdentifier(name) => {
                if self.at_symbol("(") {
                    let function = self.function_call(name, token.position)?;
                    Ok(Expr::Path(Box::new(Expr::This), vec![Step::Call(function)]))
                } else {
                    Ok(Expr::Identifier(name))
                }
            }
            TokenKind::Symbol(symbol @ ("+" | "-")) => Err(unsupported(&token, "operator", symbol)),
            _ => Err(unexpected(&token, "an expression")),
        }
    }

    /// Called with the `(` next; reads the arguments and checks them against the function.
    fn function_call(&mut self, name: String, position: usize) -> Result<Function, ParseError> {
        self.advance();
        self.enter()?;
        let mut arguments = Vec::new();
        if !self.at_symbol(")") {
            loop {
                arguments.push(self.expression()?);
                if self.at_symbol(",") {
                    self.advance();
                } else {
                    break;
                }
            }
        }
        self.leave();
        self.expect_symbol(")", "`,` or `)`")?;
        let wrong = |expected: &'static str| ParseError::WrongArguments {
            position,
            name: name.clone(),
            expected,
        };
        let mut arguments = arguments.into_iter();
        let first = arguments.next();
        if arguments.next().is_some() {
            return Err(wrong("at most one argument"));
        }
        let function = match (name.as_str(), first) {
            ("where", Some(criteria)) => Function::Where(Box::new(criteria)),
            ("where", None) => return Err(wrong("one criteria argument")),
            ("exists", criteria) => Function::Exists(criteria.map(Box::new)),
            ("empty", None) => Function::Empty,
            ("not", None) => Function::Not,
            ("first", None) => Function::First,
            ("last", None) => Function::Last,
            ("resolve", None) => Function::Resolve,
            ("empty" | "not" | "first" | "last" | "resolve", Some(_)) => {
                return Err(wrong("no arguments"))
            }
            ("as" | "ofType" | "is", argument) => {
                let type_name = argument
                    .and_then(type_name_of)
                    .ok_or_else(|| wrong("one type name"))?;
                if name == "is" {
                    Function::Is(type_name)
                } else {
                    Function::OfType(type_name)
                }
            }
            ("extension", Some(Expr::Literal(Literal::Text(url)))) => Function::Extension(url),
            ("extension", _) => return Err(wrong("one string literal")),
            _ => {
                return Err(ParseError::Unsupported {
                    position,
                    what: "function",
                    name,
                })
            }
        };
        Ok(function)
    }
}

fn text_literal(text: &str) -> Expr {
    Expr::Literal(Literal::Text(text.to_owned()))
}

/// The type named by a function argument: `Quantity` or `FHIR.Quantity`.
fn type_name_of(argument: Expr) -> Option<String> {
    match argument {
        Expr::Identifier(name) => Some(name),
        Expr::Path(namespace, steps) if matches!(&*namespace, Expr::Identifier(n) if n == "FHIR" || n == "System") => {
            match <[Step; 1]>::try_from(steps) {
                Ok([Step::Member(name)]) => Some(name),
                _ => None,
            }
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// One member of a collection during evaluation. `'a` is the resource, `'e` the expression
/// (whose literals can be compared but never returned).
#[derive(Debug, Clone, Copy)]
enum Item<'a, 'e> {
    Node(Node<'a>),
    Boolean(bool),
    Text(&'e str),
    Number(f64),
    /// What `resolve()` gives for a reference outside the resource: only the target's type.
    External {
        resource_type: &'a str,
    },
}

impl<'a> Item<'a, '_> {
    fn into_node(self) -> Option<Node<'a>> {
        match self {
            Item::Node(node) => Some(node),
            Item::Boolean(value) => Some(Node {
                value: if value { &TRUE_VALUE } else { &FALSE_VALUE },
                type_hint: Some("boolean"),
            }),
            Item::Text(_) | Item::Number(_) | Item::External { .. } => None,
        }
    }
}

/// A primitive view of an item, for equality.
#[derive(PartialEq)]
enum Primitive<'x> {
    Text(&'x str),
    Number(f64),
    Boolean(bool),
}

struct Evaluator<'a, 'e, 'c> {
    resource: &'a Value,
    context: &'c [Item<'a, 'e>],
}

type Collection<'a, 'e> = Vec<Item<'a, 'e>>;

impl<'a, 'e> Evaluator<'a, 'e, '_> {
    fn eval(&self, expr: &'e Expr, focus: &[Item<'a, 'e>]) -> Collection<'a, 'e> {
        match expr {
            Expr::This => focus.to_vec(),
            Expr::Resource => vec![Item::Node(Node {
                value: self.resource,
                type_hint: self.resource.get("resourceType").and_then(Value::as_str),
            })],
            Expr::Context => self.context.to_vec(),
            Expr::Literal(Literal::Text(text)) => vec![Item::Text(text)],
            Expr::Literal(Literal::Number(number)) => vec![Item::Number(*number)],
            Expr::Literal(Literal::Boolean(value)) => vec![Item::Boolean(*value)],
            Expr::Empty => Vec::new(),
            Expr::Identifier(name) => {
                if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    focus
                        .iter()
                        .copied()
                        .filter(|item| is_of_type(item, name))
                        .collect()
                } else {
                    members(focus, name)
                }
            }
            Expr::Path(start, steps) => {
                let mut items = self.eval(start, focus);
                for step in steps {
                    items = match step {
                        Step::Member(name) => members(&items, name),
                        Step::Index(index) => self.index(items, index, focus),
                        Step::Call(function) => self.call(function, items),
                    };
                }
                items
            }
            Expr::Union(operands) => operands
                .iter()
                .flat_map(|operand| self.eval(operand, focus))
                .collect(),
            Expr::Equality {
                left,
                right,
                negated,
            } => {
                let left = self.eval(left, focus);
                let right = self.eval(right, focus);
                if left.is_empty() || right.is_empty() {
                    return Vec::new();
                }
                let equal = left.len() == right.len()
                    && left.iter().zip(&right).all(|(a, b)| items_equal(a, b));
                vec![Item::Boolean(equal != *negated)]
            }
            Expr::Logic(operator, left, right) => {
                let left = as_boolean(&self.eval(left, focus));
                // Short-circuit where the left side already decides.
                let decided = match (operator, left) {
                    (LogicOperator::And, Some(false)) => Some(false),
                    (LogicOperator::Or, Some(true)) => Some(true),
                    (LogicOperator::Implies, Some(false)) => Some(true),
                    _ => None,
                };
                let result = match decided {
                    Some(value) => Some(value),
                    None => {
                        let right = as_boolean(&self.eval(right, focus));
                        combine(*operator, left, right)
                    }
                };
                result.map(Item::Boolean).into_iter().collect()
            }
            Expr::TypeTest(operand, type_name) => type_test(&self.eval(operand, focus), type_name),
            Expr::TypeCast(operand, type_name) => self
                .eval(operand, focus)
                .into_iter()
                .filter(|item| is_of_type(item, type_name))
                .collect(),
        }
    }

    /// `items[index]`; the index is evaluated where the path started.
    fn index(
        &self,
        items: Collection<'a, 'e>,
        index: &'e Expr,
        focus: &[Item<'a, 'e>],
    ) -> Collection<'a, 'e> {
        match self.eval(index, focus).as_slice() {
            [Item::Number(number)] if number.fract() == 0.0 && *number >= 0.0 => {
                // The check above makes the conversion exact (saturating if huge).
                let position = *number as usize;
                items.get(position).copied().into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    fn call(&self, function: &'e Function, input: Collection<'a, 'e>) -> Collection<'a, 'e> {
        match function {
            Function::Where(criteria) => input
                .into_iter()
                .filter(|item| self.holds(criteria, *item))
                .collect(),
            Function::Exists(criteria) => {
                let exists = match criteria {
                    None => !input.is_empty(),
                    Some(criteria) => input.iter().any(|item| self.holds(criteria, *item)),
                };
                vec![Item::Boolean(exists)]
            }
            Function::Empty => vec![Item::Boolean(input.is_empty())],
            Function::Not => as_boolean(&input)
                .map(|value| Item::Boolean(!value))
                .into_iter()
                .collect(),
            Function::First => input.first().copied().into_iter().collect(),
            Function::Last => input.last().copied().into_iter().collect(),
            Function::OfType(type_name) => input
                .into_iter()
                .filter(|item| is_of_type(item, type_name))
                .collect(),
            Function::Is(type_name) => type_test(&input, type_name),
            Function::Resolve => input
                .into_iter()
                .filter_map(|item| self.resolve(item))
                .collect(),
            Function::Extension(url) => members(&input, "extension")
                .into_iter()
                .filter(|item| match item {
                    Item::Node(node) => {
                        node.value.get("url").and_then(Value::as_str) == Some(url.as_str())
                    }
                    _ => false,
                })
                .collect(),
        }
    }

    /// Whether `criteria`, evaluated with `item` as `$this`, is true.
    fn holds(&self, criteria: &'e Expr, item: Item<'a, 'e>) -> bool {
        as_boolean(&self.eval(criteria, &[item])) == Some(true)
    }

    fn resolve(&self, item: Item<'a, 'e>) -> Option<Item<'a, 'e>> {
        let Item::Node(node) = item else {
            return None;
        };
        let (reference, declared_type) = match node.value {
            Value::Object(object) => (
                object.get("reference").and_then(Value::as_str),
                object.get("type").and_then(Value::as_str),
            ),
            // canonical and uri elements hold the target's address directly.
            Value::String(text) => (Some(text.as_str()), None),
            _ => return None,
        };
        if let Some(fragment) = reference.and_then(|r| r.strip_prefix('#')) {
            return self.contained(fragment);
        }
        let resource_type = reference
            .and_then(parse_literal_reference)
            .map(|parsed| parsed.resource_type)
            .or(declared_type)?;
        Some(Item::External { resource_type })
    }

    /// The contained resource with this id; `#` alone means the containing resource itself.
    fn contained(&self, id: &str) -> Option<Item<'a, 'e>> {
        let target = if id.is_empty() {
            self.resource
        } else {
            self.resource
                .get("contained")?
                .as_array()?
                .iter()
                .find(|candidate| candidate.get("id").and_then(Value::as_str) == Some(id))?
        };
        Some(Item::Node(Node {
            value: target,
            type_hint: target.get("resourceType").and_then(Value::as_str),
        }))
    }
}

/// FHIRPath's singleton evaluation of collections as booleans: empty is unknown, one boolean
/// is itself, any other single item is true, several items are an error (unknown here).
fn as_boolean(items: &[Item<'_, '_>]) -> Option<bool> {
    match items {
        [Item::Boolean(value)] => Some(*value),
        [Item::Node(Node {
            value: Value::Bool(value),
            ..
        })] => Some(*value),
        [_] => Some(true),
        _ => None,
    }
}

/// Three-valued logic, with `None` as the empty collection.
fn combine(operator: LogicOperator, left: Option<bool>, right: Option<bool>) -> Option<bool> {
    match operator {
        LogicOperator::And => match (left, right) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        LogicOperator::Or => match (left, right) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        LogicOperator::Xor => match (left, right) {
            (Some(a), Some(b)) => Some(a != b),
            _ => None,
        },
        LogicOperator::Implies => match (left, right) {
            (Some(false), _) | (_, Some(true)) => Some(true),
            (Some(true), Some(false)) => Some(false),
            _ => None,
        },
    }
}

/// `is`: a single item gives a boolean; an empty or larger collection gives nothing.
fn type_test<'a, 'e>(items: &[Item<'a, 'e>], type_name: &str) -> Collection<'a, 'e> {
    match items {
        [item] => vec![Item::Boolean(is_of_type(item, type_name))],
        _ => Vec::new(),
    }
}

/// The members called `name` of every item, arrays flattened. A missing member is looked up
/// as a choice element (`value` → `valueQuantity`), whose type becomes the node's hint.
fn members<'a, 'e>(items: &[Item<'a, 'e>], name: &str) -> Collection<'a, 'e> {
    let mut found = Vec::new();
    for item in items {
        let Item::Node(node) = item else {
            continue;
        };
        let Value::Object(object) = node.value else {
            continue;
        };
        if let Some(member) = object.get(name) {
            push_flattened(&mut found, member, None);
        } else {
            push_choice_variants(&mut found, object, name);
        }
    }
    found
}

fn push_choice_variants<'a>(
    found: &mut Collection<'a, '_>,
    object: &'a Map<String, Value>,
    name: &str,
) {
    for (key, member) in object {
        let Some(suffix) = key.strip_prefix(name) else {
            continue;
        };
        if NOT_CHOICE_VARIANTS.contains(&key.as_str()) {
            continue;
        }
        if let Some(&(_, fhir_type)) = CHOICE_TYPES.iter().find(|(s, _)| *s == suffix) {
            push_flattened(found, member, Some(fhir_type));
        }
    }
}

/// Adds a member's value, one node per array entry. Nulls (which pad primitive arrays that
/// have extensions) are skipped. A resource gets its `resourceType` as hint.
fn push_flattened<'a>(
    found: &mut Collection<'a, '_>,
    value: &'a Value,
    type_hint: Option<&'static str>,
) {
    let node = |value: &'a Value| {
        let hint = type_hint.or_else(|| value.get("resourceType").and_then(Value::as_str));
        Item::Node(Node {
            value,
            type_hint: hint,
        })
    };
    match value {
        Value::Null => {}
        Value::Array(entries) => {
            found.extend(entries.iter().filter(|entry| !entry.is_null()).map(node))
        }
        _ => found.push(node(value)),
    }
}

fn primitive<'i>(item: &'i Item<'_, '_>) -> Option<Primitive<'i>> {
    match item {
        Item::Text(text) => Some(Primitive::Text(text)),
        Item::Number(number) => Some(Primitive::Number(*number)),
        Item::Boolean(value) => Some(Primitive::Boolean(*value)),
        Item::Node(node) => match node.value {
            Value::String(text) => Some(Primitive::Text(text)),
            Value::Number(number) => number.as_f64().map(Primitive::Number),
            Value::Bool(value) => Some(Primitive::Boolean(*value)),
            _ => None,
        },
        Item::External { .. } => None,
    }
}

fn items_equal(left: &Item<'_, '_>, right: &Item<'_, '_>) -> bool {
    if let (Item::Node(a), Item::Node(b)) = (left, right) {
        if a.value.is_object() || b.value.is_object() {
            return a.value == b.value;
        }
    }
    match (primitive(left), primitive(right)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Whether an item is of the named type, by its hint, its JSON, or its resourceType.
fn is_of_type(item: &Item<'_, '_>, wanted: &str) -> bool {
    match item {
        Item::Node(node) => {
            if let Some(resource_type) = node.value.get("resourceType").and_then(Value::as_str) {
                return resource_is_of_type(resource_type, wanted);
            }
            let actual = node.type_hint.or(match node.value {
                Value::Bool(_) => Some("boolean"),
                Value::Number(number) if number.is_i64() || number.is_u64() => Some("integer"),
                Value::Number(_) => Some("decimal"),
                _ => None,
            });
            actual.is_some_and(|actual| type_is(actual, wanted))
        }
        Item::Boolean(_) => type_is("boolean", wanted),
        Item::Text(_) => type_is("string", wanted),
        Item::Number(number) if number.fract() == 0.0 => type_is("integer", wanted),
        Item::Number(_) => type_is("decimal", wanted),
        Item::External { resource_type } => resource_is_of_type(resource_type, wanted),
    }
}

fn resource_is_of_type(resource_type: &str, wanted: &str) -> bool {
    resource_type == wanted
        || wanted == "Resource"
        || (wanted == "DomainResource"
            && !matches!(resource_type, "Bundle" | "Binary" | "Parameters"))
}

/// Type equality up FHIR's hierarchy of data types, ignoring case (see the module docs).
fn type_is(actual: &str, wanted: &str) -> bool {
    if actual.eq_ignore_ascii_case(wanted) {
        return true;
    }
    let parent = match actual {
        "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity" | "MoneyQuantity" => {
            "Quantity"
        }
        "code" | "id" | "markdown" => "string",
        "canonical" | "url" | "uuid" | "oid" => "uri",
        "positiveInt" | "unsignedInt" => "integer",
        _ => return false,
    };
    parent.eq_ignore_ascii_case(wanted)
}

// ---------------------------------------------------------------------------------------------
// Literal references
// ---------------------------------------------------------------------------------------------

/// The parts of a literal FHIR reference: `Patient/123`, `Patient/123/_history/2`, or the same
/// after a service base (`http://example.org/fhir/Patient/123`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralReference<'r> {
    /// The service base of an absolute reference, without its trailing slash
    /// (`http://example.org/fhir`); `None` for a relative reference.
    pub base: Option<&'r str>,
    pub resource_type: &'r str,
    pub id: &'r str,
    /// The version after `/_history/`, if any.
    pub version: Option<&'r str>,
}

/// Parses a literal reference; `None` for anything else (`urn:uuid:…`, `#contained`, a
/// canonical with `|version`, a type name that is not capitalised alphanumerics, an id that
/// breaks `[A-Za-z0-9\-\.]{1,64}`).
pub fn parse_literal_reference(reference: &str) -> Option<LiteralReference<'_>> {
    let (base_and_path, path) = match reference.find("://") {
        Some(scheme_end) => {
            let after_scheme = reference.get(scheme_end + 3..)?;
            let path_start = after_scheme.find('/')?;
            (true, after_scheme.get(path_start + 1..)?)
        }
        None => (false, reference),
    };
    let segments: Vec<&str> = path.split('/').collect();
    let (resource_type, id, version, leading) = match segments.as_slice() {
        [leading @ .., resource_type, id, "_history", version] => {
            (*resource_type, *id, Some(*version), leading.len())
        }
        [leading @ .., resource_type, id] => (*resource_type, *id, None, leading.len()),
        _ => return None,
    };
    if leading > 0 && !base_and_path {
        return None;
    }
    if !is_resource_type_name(resource_type) || !is_id(id) || !version.is_none_or(is_id) {
        return None;
    }
    let base = if base_and_path {
        let tail_length = resource_type.len()
            + 1
            + id.len()
            + version.map_or(0, |v| "/_history/".len() + v.len());
        // The tail is preceded by a '/', which the base does not keep.
        Some(reference.get(..reference.len().checked_sub(tail_length + 1)?)?)
    } else {
        None
    };
    Some(LiteralReference {
        base,
        resource_type,
        id,
        version,
    })
}

/// A plausible resource type name: a capital letter, then letters and digits.
fn is_resource_type_name(text: &str) -> bool {
    let mut characters = text.chars();
    characters.next().is_some_and(|c| c.is_ascii_uppercase())
        && characters.all(|c| c.is_ascii_alphanumeric())
}

/// FHIR's id: `[A-Za-z0-9\-\.]{1,64}`.
fn is_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Also the shared example-data helpers of the search modules' tests.
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn parse(text: &str) -> Expression {
        match Expression::parse(text) {
            Ok(expression) => expression,
            Err(error) => panic!("{text}: {error}"),
        }
    }

    /// The values an expression yields on a resource.
    fn values(text: &str, resource: &Value) -> Vec<Value> {
        parse(text)
            .evaluate(resource)
            .into_iter()
            .map(|node| node.value.clone())
            .collect()
    }

    fn hints<'a>(text: &str, resource: &'a Value) -> Vec<Option<&'a str>> {
        parse(text)
            .evaluate(resource)
            .into_iter()
            .map(|node| node.type_hint)
            .collect()
    }

    fn error(text: &str) -> ParseError {
        match Expression::parse(text) {
            Ok(parsed) => panic!("{text} parsed as {parsed:?}"),
            Err(error) => error,
        }
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "o1",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2016-03-28",
            "valueQuantity": {"value": 185, "unit": "lbs"},
            "component": [
                {"code": {"text": "a"}, "valueQuantity": {"value": 1}},
                {"code": {"text": "b"}, "valueString": "two"},
                {"code": {"text": "c"}, "valueCodeableConcept": {"text": "three"}}
            ]
        })
    }

    #[test]
    fn parse_errors_say_what_and_where() {
        assert_eq!(
            error("Patient.name."),
            ParseError::Unexpected {
                position: 13,
                expected: "an element or function name",
                found: "the end of the expression".into()
            }
        );
        assert!(matches!(
            error("Patient.name + 1"),
            ParseError::Unsupported {
                position: 13,
                what: "operator",
                ..
            }
        ));
        assert!(matches!(
            error("Patient.birthDate < today()"),
            ParseError::Unsupported {
                position: 18,
                what: "operator",
                ..
            }
        ));
        assert!(matches!(
            error("Patient.name.count()"),
            ParseError::Unsupported {
                position: 13,
                what: "function",
                ..
            }
        ));
        assert!(matches!(
            error("Patient.name.where()"),
            ParseError::WrongArguments { position: 13, .. }
        ));
        assert!(matches!(
            error("Patient.name.first(1)"),
            ParseError::WrongArguments { .. }
        ));
        assert!(matches!(
            error("Patient.extension(url)"),
            ParseError::WrongArguments { .. }
        ));
        assert!(matches!(
            error("Patient.name.as('x')"),
            ParseError::WrongArguments { .. }
        ));
        assert_eq!(
            error("name.where(use = 'official"),
            ParseError::Unterminated {
                position: 17,
                what: "string"
            }
        );
        assert_eq!(
            error("Patient.#x"),
            ParseError::UnexpectedCharacter {
                position: 8,
                found: '#'
            }
        );
        assert!(matches!(
            error("%foo"),
            ParseError::Unsupported {
                what: "variable",
                ..
            }
        ));
        assert!(matches!(
            error("Patient.name)"),
            ParseError::Unexpected { position: 12, .. }
        ));
        assert!(matches!(
            error("Patient in x"),
            ParseError::Unsupported { .. }
        ));
        assert!(matches!(
            error("'\\q'"),
            ParseError::InvalidEscape { position: 1 }
        ));
        assert!(matches!(
            error("/* open"),
            ParseError::Unterminated {
                what: "comment",
                ..
            }
        ));
        assert!(matches!(
            error(""),
            ParseError::Unexpected { position: 0, .. }
        ));
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(matches!(error(&deep), ParseError::TooDeep { .. }));
        let long = vec!["a"; MAX_TOKENS].join(" | ");
        assert_eq!(error(&long), ParseError::TooLong);
        let message = error("Patient.name + 1").to_string();
        assert_eq!(message, "unsupported operator `+` at offset 13");
    }

    /// Evaluation recurses on the parsed tree, so the deepest tree accepted must evaluate,
    /// and the deepest rejected must be dropped, within a small thread stack (tokio's
    /// workers have 2 MiB; this gives 512 KiB, in debug builds).
    #[test]
    fn the_deepest_expressions_fit_a_small_stack() {
        let on_small_stack = |text: String| {
            std::thread::Builder::new()
                .stack_size(512 * 1024)
                .spawn(move || {
                    let resource = json!({"resourceType": "Basic", "a": [{"a": 1}]});
                    Expression::parse(&text).map(|parsed| parsed.evaluate(&resource).len())
                })
                .map(|handle| handle.join())
        };
        let chain = |operator: &str, operands: usize| vec!["a"; operands].join(operator);
        // Long unions and paths are flat, however long.
        let longest = MAX_TOKENS / 2;
        assert!(matches!(on_small_stack(chain("|", longest)), Ok(Ok(Ok(n))) if n == longest));
        assert!(matches!(on_small_stack(chain(".", longest)), Ok(Ok(Ok(0)))));
        // Other operators nest; a chain of MAX_DEPTH operands is MAX_DEPTH deep.
        assert!(matches!(
            on_small_stack(chain("=", MAX_DEPTH)),
            Ok(Ok(Ok(_)))
        ));
        assert!(matches!(
            on_small_stack(chain("=", MAX_DEPTH + 1)),
            Ok(Ok(Err(ParseError::TooComplex)))
        ));
        assert!(matches!(
            on_small_stack(chain(" and ", longest)),
            Ok(Ok(Err(ParseError::TooComplex)))
        ));
        let nested_where = format!("{}a{}", "a.where(".repeat(31), ")".repeat(31));
        assert!(matches!(on_small_stack(nested_where), Ok(Ok(Ok(_)))));
    }

    #[test]
    fn lexical_forms() {
        let patient = json!({"resourceType": "Patient", "name": [{"family": "O'Hara"}]});
        assert_eq!(
            values("Patient.name.where(family = 'O\\'Hara').family", &patient),
            [json!("O'Hara")]
        );
        assert_eq!(values("Patient.`name`.family", &patient), [json!("O'Hara")]);
        assert_eq!(
            values(
                "Patient /* the type */ .name // the names\n .family",
                &patient
            ),
            [json!("O'Hara")]
        );
        assert_eq!(
            values(
                "Patient.name.where(family = '\\u004F\\'Hara').family",
                &patient
            ),
            [json!("O'Hara")]
        );
        assert!(values("{}", &patient).is_empty());
        assert_eq!(values("true", &patient), [json!(true)]);
        // Literals themselves are never part of a result.
        assert!(values("'text' | 1.5", &patient).is_empty());
    }

    #[test]
    fn paths_flatten_arrays_and_skip_nulls() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{"given": ["A", null, "B"]}, {"given": ["C"]}, null],
            "_birthDate": {"extension": []}
        });
        assert_eq!(
            values("Patient.name.given", &patient),
            [json!("A"), json!("B"), json!("C")]
        );
        assert!(values("Patient.birthDate", &patient).is_empty());
        assert!(values("Patient.name.given.nothing", &patient).is_empty());
        assert_eq!(hints("Patient", &patient), [Some("Patient")]);
    }

    #[test]
    fn leading_type_name_must_match_the_resource() {
        let resource = observation();
        assert!(values("Patient.id", &resource).is_empty());
        assert_eq!(values("Observation.id", &resource), [json!("o1")]);
        assert_eq!(values("Resource.id", &resource), [json!("o1")]);
        assert_eq!(values("DomainResource.id", &resource), [json!("o1")]);
        let bundle = json!({"resourceType": "Bundle", "id": "b"});
        assert!(values("DomainResource.id", &bundle).is_empty());
        assert_eq!(values("Resource.id", &bundle), [json!("b")]);
        assert_eq!(
            values("Patient.id | Observation.id | Bundle.id", &bundle),
            [json!("b")]
        );
    }

    #[test]
    fn choice_elements_carry_their_type() {
        let resource = observation();
        assert_eq!(hints("Observation.value", &resource), [Some("Quantity")]);
        assert_eq!(
            hints("Observation.effective", &resource),
            [Some("dateTime")]
        );
        assert_eq!(
            values("(Observation.value as Quantity)", &resource),
            [json!({"value": 185, "unit": "lbs"})]
        );
        assert_eq!(
            values("Observation.value.as(Quantity).unit", &resource),
            [json!("lbs")]
        );
        assert!(values("Observation.value as string", &resource).is_empty());
        assert_eq!(
            values("Observation.effective as dateTime", &resource),
            [json!("2016-03-28")]
        );
        // FHIRPath System types match FHIR primitives whatever the case.
        assert_eq!(
            values("Observation.effective.as(DateTime)", &resource),
            [json!("2016-03-28")]
        );
        assert_eq!(
            values("Observation.effective.as(FHIR.dateTime)", &resource),
            [json!("2016-03-28")]
        );
        assert!(values("Observation.effective as date", &resource).is_empty());
        assert_eq!(
            values("Observation.component.value.ofType(string)", &resource),
            [json!("two")]
        );
        assert_eq!(
            values(
                "(Observation.component.value as CodeableConcept).text",
                &resource
            ),
            [json!("three")]
        );
        assert_eq!(
            values("Observation.value is Quantity", &resource),
            [json!(true)]
        );
        assert_eq!(
            values("Observation.value.is(Range)", &resource),
            [json!(false)]
        );
        assert_eq!(
            values("Observation.value is System.Quantity", &resource),
            [json!(true)]
        );
        // `is` wants a single item.
        assert!(values("Observation.component.value is Quantity", &resource).is_empty());
        assert!(values("Observation.nothing is Quantity", &resource).is_empty());
    }

    #[test]
    fn type_hierarchy_and_inferred_types() {
        let condition = json!({
            "resourceType": "Condition",
            "onsetAge": {"value": 52, "unit": "yr"},
            "abatementString": "around April",
            "recordedDate": "2013-04-04"
        });
        assert_eq!(values("Condition.onset.as(Quantity)", &condition).len(), 1);
        assert_eq!(values("Condition.onset.as(Age)", &condition).len(), 1);
        assert!(values("Condition.onset.as(Range)", &condition).is_empty());
        assert_eq!(
            values("Condition.abatement.as(string)", &condition).len(),
            1
        );
        // An ordinary element has no hint, so a type test on a string is false.
        assert_eq!(
            values("Condition.recordedDate is dateTime", &condition),
            [json!(false)]
        );
        let patient = json!({"resourceType": "Patient", "active": true, "multipleBirthInteger": 2});
        assert_eq!(values("Patient.active is boolean", &patient), [json!(true)]);
        assert_eq!(
            values("Patient.multipleBirth is integer", &patient),
            [json!(true)]
        );
        assert_eq!(hints("Patient.multipleBirth", &patient), [Some("integer")]);
    }

    #[test]
    fn elements_that_only_look_like_choice_variants_are_not_taken() {
        let coverage = json!({"resourceType": "Coverage", "subscriberId": "123"});
        assert!(values("Coverage.subscriber", &coverage).is_empty());
        assert_eq!(values("Coverage.subscriberId", &coverage), [json!("123")]);
        let encounter = json!({"resourceType": "Encounter", "classHistory": [{}]});
        assert!(values("Encounter.class", &encounter).is_empty());
    }

    #[test]
    fn where_compares_strings() {
        let patient = json!({
            "resourceType": "Patient",
            "telecom": [
                {"system": "phone", "value": "1"},
                {"system": "email", "value": "a@b"},
                {"value": "nothing"},
                {"system": "phone", "value": "2"}
            ]
        });
        assert_eq!(
            values("Patient.telecom.where(system='phone').value", &patient),
            [json!("1"), json!("2")]
        );
        assert_eq!(
            values("Patient.telecom.where(system != 'phone').value", &patient),
            [json!("a@b")]
        );
        assert_eq!(
            values(
                "Patient.telecom.where($this.system = 'email').value",
                &patient
            ),
            [json!("a@b")]
        );
        assert!(values("Patient.telecom.where(system='fax')", &patient).is_empty());
        assert_eq!(
            values("Patient.telecom.exists(system = 'email')", &patient),
            [json!(true)]
        );
        assert_eq!(
            values(
                "Patient.telecom.where(system='phone').first().value",
                &patient
            ),
            [json!("1")]
        );
        assert_eq!(
            values(
                "Patient.telecom.where(system='phone').last().value",
                &patient
            ),
            [json!("2")]
        );
        assert_eq!(values("Patient.telecom[1].value", &patient), [json!("a@b")]);
        assert!(values("Patient.telecom[9]", &patient).is_empty());
    }

    #[test]
    fn resolve_knows_the_target_type() {
        let observation = json!({
            "resourceType": "Observation",
            "contained": [{"resourceType": "Patient", "id": "inline"}],
            "performer": [
                {"reference": "Patient/1"},
                {"reference": "https://example.org/fhir/Practitioner/2/_history/3"},
                {"reference": "urn:uuid:9f2e1a8e-7c1a-4b1e-9d55-000000000000"},
                {"type": "Patient", "identifier": {"value": "mrn"}},
                {"reference": "#inline"},
                {"reference": "#missing"},
                {"display": "Someone"}
            ]
        });
        let patients = values(
            "Observation.performer.where(resolve() is Patient)",
            &observation,
        );
        assert_eq!(
            patients,
            [
                json!({"reference": "Patient/1"}),
                json!({"type": "Patient", "identifier": {"value": "mrn"}}),
                json!({"reference": "#inline"})
            ]
        );
        assert_eq!(
            values(
                "Observation.performer.where(resolve() is Practitioner)",
                &observation
            )
            .len(),
            1
        );
        assert_eq!(
            values(
                "Observation.performer.where(resolve() is Resource)",
                &observation
            )
            .len(),
            4
        );
        // Only a contained target can be returned; the others are not here to return.
        assert_eq!(
            values("Observation.performer.resolve()", &observation),
            [json!({"resourceType": "Patient", "id": "inline"})]
        );
        assert_eq!(
            values("Observation.performer.resolve().id", &observation),
            [json!("inline")]
        );
    }

    #[test]
    fn logic_and_equality() {
        let deceased = "Patient.deceased.exists() and Patient.deceased != false";
        let living = json!({"resourceType": "Patient", "deceasedBoolean": false});
        let dead = json!({"resourceType": "Patient", "deceasedBoolean": true});
        let dated = json!({"resourceType": "Patient", "deceasedDateTime": "2015-01-01"});
        let unknown = json!({"resourceType": "Patient"});
        assert_eq!(values(deceased, &living), [json!(false)]);
        assert_eq!(values(deceased, &dead), [json!(true)]);
        assert_eq!(values(deceased, &dated), [json!(true)]);
        assert_eq!(values(deceased, &unknown), [json!(false)]);
        assert_eq!(hints(deceased, &dead), [Some("boolean")]);

        let resource = json!({"resourceType": "Basic", "t": true, "f": false, "n": 5});
        assert_eq!(values("t or nothing", &resource), [json!(true)]);
        assert!(values("f or nothing", &resource).is_empty());
        assert_eq!(values("f and nothing", &resource), [json!(false)]);
        assert!(values("t and nothing", &resource).is_empty());
        assert_eq!(values("t xor f", &resource), [json!(true)]);
        assert_eq!(values("t xor t", &resource), [json!(false)]);
        assert_eq!(values("f implies nothing", &resource), [json!(true)]);
        assert_eq!(values("t implies f", &resource), [json!(false)]);
        assert_eq!(values("n = 5", &resource), [json!(true)]);
        assert_eq!(values("n = 5.0", &resource), [json!(true)]);
        assert_eq!(values("n = '5'", &resource), [json!(false)]);
        assert!(values("nothing = 5", &resource).is_empty());
        assert_eq!(values("f.not()", &resource), [json!(true)]);
        assert_eq!(values("nothing.empty()", &resource), [json!(true)]);
        assert_eq!(values("n.exists()", &resource), [json!(true)]);
        assert_eq!(values("t = f | t", &resource), [json!(false)]);
    }

    #[test]
    fn union_keeps_order_and_duplicates() {
        let resource = observation();
        assert_eq!(
            values(
                "Observation.id | Observation.id | Observation.component.code.text",
                &resource
            ),
            [json!("o1"), json!("o1"), json!("a"), json!("b"), json!("c")]
        );
    }

    #[test]
    fn extension_by_url() {
        let patient = json!({
            "resourceType": "Patient",
            "extension": [
                {"url": "http://example.org/a", "valueString": "A"},
                {"url": "http://example.org/b", "valueCode": "B"}
            ]
        });
        assert_eq!(
            values("Patient.extension('http://example.org/b').value", &patient),
            [json!("B")]
        );
        assert_eq!(
            hints("Patient.extension('http://example.org/b').value", &patient),
            [Some("code")]
        );
    }

    #[test]
    fn component_expressions_start_from_the_given_focus() {
        let resource = observation();
        let components = parse("Observation.component").evaluate(&resource);
        let value = parse("value.as(Quantity) | value.as(Range)");
        let found: Vec<_> = components
            .iter()
            .map(|component| value.evaluate_from(&resource, &[*component]).len())
            .collect();
        assert_eq!(found, [1, 0, 0]);
        let code = parse("code.text");
        assert_eq!(
            code.evaluate_from(&resource, &components[1..2])[0].value,
            &json!("b")
        );
        let whole = parse("%resource.id");
        assert_eq!(
            whole.evaluate_from(&resource, &components)[0].value,
            &json!("o1")
        );
        let context = parse("%context.code.text");
        assert_eq!(context.evaluate_from(&resource, &components).len(), 3);
    }

    #[test]
    fn literal_references() {
        let parsed = parse_literal_reference;
        assert_eq!(
            parsed("Patient/123"),
            Some(LiteralReference {
                base: None,
                resource_type: "Patient",
                id: "123",
                version: None
            })
        );
        assert_eq!(
            parsed("Patient/123/_history/4"),
            Some(LiteralReference {
                base: None,
                resource_type: "Patient",
                id: "123",
                version: Some("4")
            })
        );
        assert_eq!(
            parsed("http://x.org/fhir/Observation/a.b-c/_history/2"),
            Some(LiteralReference {
                base: Some("http://x.org/fhir"),
                resource_type: "Observation",
                id: "a.b-c",
                version: Some("2")
            })
        );
        assert_eq!(
            parsed("https://x.org/Patient/1").map(|r| r.base),
            Some(Some("https://x.org"))
        );
        for not_literal in [
            "urn:uuid:9f2e1a8e-7c1a-4b1e-9d55-000000000000",
            "urn:oid:1.2.3",
            "#p1",
            "Patient",
            "patient/1",
            "Patient/",
            "/Patient/1",
            "fhir/Patient/1",
            "Patient/1 2",
            "Patient/1?x=y",
            "http://x.org/ValueSet/vs|1.0",
            "http://x.org",
            "http://x.org/Patient",
            "Patient/1/_history/",
            "",
        ] {
            assert_eq!(parsed(not_literal), None, "{not_literal}");
        }
        let long_id = "a".repeat(65);
        assert_eq!(parsed(&format!("Patient/{long_id}")), None);
        assert!(parsed(&format!("Patient/{}", "a".repeat(64))).is_some());
    }

    // ---- The official R4 definitions and examples -------------------------------------------

    /// The team's shared test data sits beside the repository (`../shared`), locally and in
    /// CI; the variables let a checkout elsewhere point at it.
    pub(crate) fn examples_dir() -> Option<PathBuf> {
        let candidates = [
            std::env::var_os("CUSTODIAN_FHIR_EXAMPLES_DIR").map(PathBuf::from),
            std::env::var_os("CUSTODIAN_TESTDATA")
                .map(|testdata| PathBuf::from(testdata).join("fhir-r4-examples")),
            Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/testdata/fhir-r4-examples"
            ))),
        ];
        let found = candidates.into_iter().flatten().find(|p| p.is_dir());
        if found.is_none() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "the FHIR examples are required in CI (set CUSTODIAN_TESTDATA)"
            );
            eprintln!("*** SKIPPING: fhir-r4-examples directory not found ***");
        }
        found
    }

    pub(crate) fn read_json(path: &std::path::Path) -> Value {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
    }

    /// Every example resource, and every resource inside the example Bundles.
    pub(crate) fn example_resources(dir: &std::path::Path) -> Vec<(String, Value)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
            .map(|entry| entry.map(|e| e.path()).unwrap_or_default())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .filter(|path| !path.ends_with("Bundle-searchParams.json"))
            .collect();
        files.sort();
        let mut resources = Vec::new();
        for file in files {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let resource = read_json(&file);
            if let Some(entries) = resource.get("entry").and_then(Value::as_array) {
                for (index, entry) in entries.iter().enumerate() {
                    if let Some(inner) = entry.get("resource") {
                        resources.push((format!("{name}#entry{index}"), inner.clone()));
                    }
                }
            }
            resources.push((name, resource));
        }
        resources
    }

    /// `(code, type, expression)` of every R4 SearchParameter, component expressions included
    /// (with the parameter's type `composite`).
    pub(crate) fn search_parameters(dir: &std::path::Path) -> Vec<(String, String, String)> {
        let bundle = read_json(&dir.join("Bundle-searchParams.json"));
        let mut parameters = Vec::new();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let parameter = &entry["resource"];
            let code = parameter["code"].as_str().unwrap_or_default().to_owned();
            let kind = parameter["type"].as_str().unwrap_or_default().to_owned();
            if let Some(expression) = parameter["expression"].as_str() {
                parameters.push((code.clone(), kind.clone(), expression.to_owned()));
            }
            for component in parameter["component"].as_array().into_iter().flatten() {
                if let Some(expression) = component["expression"].as_str() {
                    parameters.push((code.clone(), "composite".into(), expression.to_owned()));
                }
            }
        }
        parameters
    }

    fn example(dir: &std::path::Path, name: &str) -> Value {
        read_json(&dir.join(name))
    }

    #[test]
    fn every_r4_search_expression_parses_and_evaluates_on_every_example() {
        let Some(dir) = examples_dir() else { return };
        let parameters = search_parameters(&dir);
        assert!(parameters.len() > 1400, "{}", parameters.len());
        let parsed: Vec<Expression> = parameters
            .iter()
            .map(|(code, _, text)| {
                Expression::parse(text).unwrap_or_else(|e| panic!("{code}: {text}: {e}"))
            })
            .collect();
        let deepest = parsed.iter().map(|e| e.root.depth()).max();
        assert_eq!(deepest, Some(5));
        let resources = example_resources(&dir);
        assert!(resources.len() > 270, "{}", resources.len());
        let mut non_empty = 0;
        let mut resource_types_matched = std::collections::BTreeSet::new();
        for (name, resource) in &resources {
            for ((code, _, _), expression) in parameters.iter().zip(&parsed) {
                let nodes = expression.evaluate(resource);
                for node in &nodes {
                    assert!(!node.value.is_array(), "{name} {code}: array node");
                }
                if !nodes.is_empty() {
                    non_empty += 1;
                    resource_types_matched.insert(resource["resourceType"].to_string());
                }
            }
        }
        // Every kind of example resource is reached by some parameter, and plenty match.
        assert!(non_empty > 3000, "{non_empty}");
        assert!(
            resource_types_matched.len() >= 15,
            "{resource_types_matched:?}"
        );
    }

    #[test]
    fn patient_example() {
        let Some(dir) = examples_dir() else { return };
        let patient = example(&dir, "Patient-example.json");
        assert_eq!(
            values("Patient.name.given", &patient),
            [
                json!("Peter"),
                json!("James"),
                json!("Jim"),
                json!("Peter"),
                json!("James")
            ]
        );
        assert_eq!(
            values("Patient.name.family", &patient),
            [json!("Chalmers"), json!("Windsor")]
        );
        let phones = values("Patient.telecom.where(system='phone')", &patient);
        assert_eq!(phones.len(), 3);
        assert!(phones.iter().all(|phone| phone["system"] == "phone"));
        assert!(values("Patient.telecom.where(system='email')", &patient).is_empty());
        assert_eq!(
            values(
                "Patient.deceased.exists() and Patient.deceased != false",
                &patient
            ),
            [json!(false)]
        );
        assert_eq!(hints("Patient.deceased", &patient), [Some("boolean")]);
        assert_eq!(
            values(
                "Patient.managingOrganization.where(resolve() is Organization)",
                &patient
            ),
            [json!({"reference": "Organization/1"})]
        );
    }

    #[test]
    fn observation_example() {
        let Some(dir) = examples_dir() else { return };
        let observation = example(&dir, "Observation-example.json");
        assert_eq!(
            values(
                "(Observation.value as Quantity) | (Observation.value as SampledData)",
                &observation
            ),
            [json!({
                "value": 185,
                "unit": "lbs",
                "system": "http://unitsofmeasure.org",
                "code": "[lb_av]"
            })]
        );
        assert_eq!(
            values(
                "Observation.subject.where(resolve() is Patient)",
                &observation
            ),
            [json!({"reference": "Patient/example"})]
        );
        assert!(values(
            "Observation.subject.where(resolve() is Group)",
            &observation
        )
        .is_empty());
        assert_eq!(
            values("Observation.code.coding.code", &observation).len(),
            4
        );
        assert_eq!(
            values("Observation.effective", &observation),
            [json!("2016-03-28")]
        );
    }

    #[test]
    fn contained_and_bundled_resources() {
        let Some(dir) = examples_dir() else { return };
        let care_plan = example(&dir, "CarePlan-example.json");
        assert_eq!(
            values("CarePlan.addresses.resolve().subject.reference", &care_plan),
            [json!("Patient/example")]
        );
        assert_eq!(
            hints("CarePlan.addresses.resolve()", &care_plan),
            [Some("Condition")]
        );
        let bundle = example(&dir, "Bundle-bundle-example.json");
        let first = parse("Bundle.entry[0].resource").evaluate(&bundle);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].type_hint, Some("MedicationRequest"));
        assert_eq!(first[0].value["id"], "3123");
    }
}
