//! SMART App Launch scopes: parsing a token's `scope` string and deciding, per request, whether
//! it allows an interaction on a resource type and under which granular constraints.
//!
//! Spec: SMART App Launch v2 (STU 2.2), "Scopes and Launch Context",
//! <https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html>. Section names below
//! refer to that page; "RFC 6749 §3.3" is the OAuth 2.0 scope syntax,
//! <https://www.rfc-editor.org/rfc/rfc6749#section-3.3>.
//!
//! # What is accepted
//! - FHIR resource scopes (§ "FHIR Resource Scope Syntax"):
//!   `(patient|user|system)/(ResourceType|*).(permissions)[?param=value&...]`.
//!   - v2 permissions are "a subset of the in-order string `.cruds`" (§ "Scopes for requesting
//!     FHIR Resources"): each of `c r u d s` at most once, in that order. Anything else (`.sr`,
//!     `.dus`, `.rr`, `.RS`, `.xyz`) is malformed: the spec lets servers ignore such requests, and
//!     ignoring is the only choice that can never widen access.
//!   - v1 permissions (same section, "v1 `.read` ⇒ v2 `.rs`, v1 `.write` ⇒ v2 `.cud`, v1 `.*` ⇒
//!     v2 `.cruds`") are accepted and mapped; v1 and v2 scopes may be mixed in one token.
//!   - The granular query (§ "Finer-grained resource constraints using search parameters") is a
//!     v2 feature, so it is only accepted after a v2 permission string.
//! - Launch context scopes (§ "Scopes for requesting context data"): `launch`, and `launch/`
//!   followed by an all-lowercase resource type (`launch/patient`, `launch/encounter`,
//!   `launch/imagingstudy`), optionally with one `?role=...`.
//! - Identity scopes (§ "Scopes for requesting identity data"): `openid`, `fhirUser`, and
//!   `profile` (the SMART v1 / OpenID Connect name still sent by older clients).
//! - Refresh-token scopes (§ "Scopes for requesting a refresh token"): `offline_access`,
//!   `online_access`.
//!
//! Non-resource scopes are kept verbatim in [`Scopes::other`]; they never grant resource access.
//!
//! # Decisions
//! - Fail closed. A scope that is not understood is dropped and reported, never approximated.
//!   In particular a granular scope whose query cannot be parsed is dropped entirely rather than
//!   kept without its constraints, which would turn `Observation.rs?category=laboratory` into
//!   `Observation.rs`.
//! - Characters: a scope token must consist of RFC 6749 §3.3 `scope-token` characters (printable
//!   ASCII except space, `"` and `\`). Scopes are separated by single ASCII spaces in the RFC;
//!   runs of spaces are tolerated here. A tab or newline therefore makes its token malformed.
//! - Resource types are matched case-sensitively and must look like a FHIR type name
//!   (`[A-Z][A-Za-z]+`); `patient/observation.rs` is malformed (the § "Patient-specific scopes"
//!   table stresses that `patient` the context and `Patient` the resource differ by case).
//! - An empty permission string (`patient/Observation.`) is treated as malformed: the railroad
//!   diagram technically allows it, but it grants nothing and is almost certainly a mistake
//!   worth logging.
//! - Granular queries are decoded with `application/x-www-form-urlencoded` rules (the
//!   `form_urlencoded` crate, `+` is a space), exactly like the server's own search query
//!   parsing, so a constraint means what the same text would mean in a search URL. Stricter
//!   than a URL query: every `&`-separated item must be `name=value` with a non-empty name and
//!   value (an empty value would be ignored by a search and so widen access), names are limited
//!   to search-parameter characters (`A-Z a-z 0-9 _ - . :`, covering modifiers and chains), and
//!   percent escapes must be well formed and decode to UTF-8 without control characters.
//! - Extension scopes (§ "Extensibility": full URIs and `__`-prefixed names) are reported as
//!   unrecognized: Custodian defines none, so they mean nothing here.
//! - Bounds: a scope token longer than [`MAX_SCOPE_LEN`] bytes is dropped, and at most
//!   [`MAX_SCOPES`] tokens are examined; the rest are dropped and summarised in one report
//!   entry. Reported strings are escaped (non-`scope-token` characters as `\u{..}`, `\n`, ...)
//!   and cut after about 200 bytes, so that they are safe to log.
//! - [`Scopes::grant`] denies any `resource_type` that is not a FHIR type name, even under a
//!   `*` scope, so a caller's unvalidated path segment cannot ride a wildcard. The one exception
//!   is `"*"` itself, meaning "every type" (system-level search and history): only `*` scopes
//!   grant it, since a typed scope covers one type, not all.
//!
//! # Applying constraints
//! A [`ScopeGrant::Constrained`] must be enforced by the caller as a filter: a resource is
//! allowed only if it matches every `(name, value)` pair of at least one inner set. A
//! constraint the caller cannot evaluate (unknown search parameter, unsupported modifier or
//! chain, which the spec calls experimental) must count as *not matching*; ignoring it would
//! widen access.

use std::collections::BTreeSet;

/// Longest scope token considered, in bytes; longer tokens are dropped and reported.
pub const MAX_SCOPE_LEN: usize = 1_000;
/// Most scope tokens considered per scope string; further tokens are dropped and reported.
pub const MAX_SCOPES: usize = 100;
/// About how much of a dropped token is kept in the report, in bytes.
const REPORT_MAX_LEN: usize = 200;

/// Who the scope speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

/// FHIR interactions as SMART v2 permissions: c(reate) r(ead) u(pdate) d(elete) s(earch).
///
/// The order of the variants is the spec's `cruds` order (`Ord` is derived for the
/// `BTreeSet` in [`ResourceScope::permissions`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

/// The v2 permission letters, in the only order the spec allows.
const CRUDS: [(char, Permission); 5] = [
    ('c', Permission::Create),
    ('r', Permission::Read),
    ('u', Permission::Update),
    ('d', Permission::Delete),
    ('s', Permission::Search),
];

/// One parsed resource scope.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceScope {
    pub context: ScopeContext,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub permissions: BTreeSet<Permission>,
    /// Granular constraints from `?name=value&...` (v2), as (name, value) pairs, e.g. `("category", "laboratory")` or
    /// `("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory")`. Empty = unconstrained.
    pub constraints: Vec<(String, String)>,
}

/// All scopes of a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scopes {
    pub resources: Vec<ResourceScope>,
    /// Other scopes kept verbatim: openid, fhirUser, launch, launch/patient, offline_access, online_access, ...
    pub other: Vec<String>,
}

/// What the scopes allow for one (context set, resource type, permission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeGrant {
    /// Not allowed at all → 403.
    Denied,
    /// Allowed without constraint.
    Unconstrained,
    /// Allowed only for resources matching at least one of these constraint sets (OR of ANDs): each inner Vec is the
    /// constraints of one granular scope (all must hold). The server applies them as search predicates / a check.
    Constrained(Vec<Vec<(String, String)>>),
}

/// Identity, launch and refresh-token scopes with a fixed spelling (see the module doc).
const FIXED_OTHER_SCOPES: [&str; 7] = [
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "offline_access",
    "online_access",
    // `launch/patient` is also covered by the `launch/<type>` rule; listed for clarity.
    "launch/patient",
];

/// How one scope token was understood.
enum Parsed {
    Resource(ResourceScope),
    Other,
    Malformed,
}

impl Scopes {
    /// Parses a space-separated scope string. Unknown or malformed resource scopes are ignored (never widen access) and
    /// reported in the second return value as the offending scope strings (for logging by the caller; not PHI).
    ///
    /// Reported strings are the tokens as given, except that characters outside the RFC 6749
    /// `scope-token` set are escaped and long tokens are cut after about 200 bytes (with their
    /// length noted); when more than [`MAX_SCOPES`] tokens are present, one extra entry says how
    /// many were skipped.
    /// Exact duplicate scopes are kept once.
    pub fn parse(scope: &str) -> (Scopes, Vec<String>) {
        let mut scopes = Scopes::default();
        let mut rejected = Vec::new();
        let mut tokens = scope.split(' ').filter(|token| !token.is_empty());

        for token in tokens.by_ref().take(MAX_SCOPES) {
            match parse_token(token) {
                Parsed::Resource(resource) => {
                    if !scopes.resources.contains(&resource) {
                        scopes.resources.push(resource);
                    }
                }
                Parsed::Other => {
                    if !scopes.other.iter().any(|other| other == token) {
                        scopes.other.push(token.to_owned());
                    }
                }
                Parsed::Malformed => rejected.push(for_report(token)),
            }
        }

        let skipped = tokens.count();
        if skipped > 0 {
            rejected.push(format!(
                "<{skipped} scope(s) after the first {MAX_SCOPES} ignored>"
            ));
        }
        (scopes, rejected)
    }

    /// The grant for `permission` on `resource_type` considering only scopes whose context is in `contexts`.
    /// A scope with resource_type None (`*`) applies to every type. If ANY applicable scope is unconstrained, the result is
    /// Unconstrained; else the constraint sets of all applicable granular scopes; else Denied.
    ///
    /// `resource_type` is the type of the request, or `"*"` for an interaction over every type
    /// (system-level search or history), which only `*` scopes grant. Anything else that is not
    /// a FHIR type name (`[A-Z][A-Za-z]+`) is Denied. Identical constraint sets are listed once.
    pub fn grant(
        &self,
        contexts: &[ScopeContext],
        resource_type: &str,
        permission: Permission,
    ) -> ScopeGrant {
        if resource_type != "*" && !is_resource_type_name(resource_type) {
            return ScopeGrant::Denied;
        }
        let mut constraint_sets: Vec<Vec<(String, String)>> = Vec::new();
        let applicable = self.resources.iter().filter(|scope| {
            contexts.contains(&scope.context)
                && scope
                    .resource_type
                    .as_deref()
                    .is_none_or(|scoped| scoped == resource_type)
                && scope.permissions.contains(&permission)
        });
        for scope in applicable {
            if scope.constraints.is_empty() {
                return ScopeGrant::Unconstrained;
            }
            if !constraint_sets.contains(&scope.constraints) {
                constraint_sets.push(scope.constraints.clone());
            }
        }
        if constraint_sets.is_empty() {
            ScopeGrant::Denied
        } else {
            ScopeGrant::Constrained(constraint_sets)
        }
    }

    /// Whether any resource scope has this context (e.g. the server needs a launch patient for `patient/` scopes).
    pub fn has_context(&self, context: ScopeContext) -> bool {
        self.resources.iter().any(|scope| scope.context == context)
    }

    /// The scopes a role gets when a dev token names none (used by `custodian token`); plain strings.
    ///
    /// Roles: `practitioner`, `patient`, `ehr-system`, `compliance-officer`, `admin`; any other
    /// role gets the empty string (no access).
    pub fn natural_for_role(role: &str) -> &'static str {
        match role {
            "practitioner" => "openid fhirUser user/*.cruds",
            "patient" => "openid fhirUser launch/patient patient/*.rs",
            "ehr-system" => "system/*.cruds",
            // Patient.d: the scope side of `Patient/$erase` (the policy allows nothing else).
            "compliance-officer" => "user/AuditEvent.rs user/Consent.rs user/Patient.d",
            "admin" => "user/*.cruds system/*.cruds",
            _ => "",
        }
    }
}

/// Classifies one non-empty, space-free token.
fn parse_token(token: &str) -> Parsed {
    if token.len() > MAX_SCOPE_LEN || !token.bytes().all(is_scope_token_byte) {
        return Parsed::Malformed;
    }
    if FIXED_OTHER_SCOPES.contains(&token) || is_launch_context_scope(token) {
        return Parsed::Other;
    }
    match parse_resource_scope(token) {
        Some(resource) => Parsed::Resource(resource),
        None => Parsed::Malformed,
    }
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_token_byte(byte: u8) -> bool {
    matches!(byte, 0x21 | 0x23..=0x5B | 0x5D..=0x7E)
}

/// § "Scopes for requesting context data": `launch/` + an all-lowercase resource type, with at
/// most one `?role=...` ("Each requested scope can include at most one role").
fn is_launch_context_scope(token: &str) -> bool {
    let Some(rest) = token.strip_prefix("launch/") else {
        return false;
    };
    let (type_name, query) = match rest.split_once('?') {
        Some((type_name, query)) => (type_name, Some(query)),
        None => (rest, None),
    };
    let type_ok = !type_name.is_empty() && type_name.bytes().all(|b| b.is_ascii_lowercase());
    let role_ok = query.is_none_or(|query| {
        query
            .strip_prefix("role=")
            .is_some_and(|role| !role.is_empty() && !role.contains('&'))
    });
    type_ok && role_ok
}

/// § "FHIR Resource Scope Syntax": `(patient|user|system)/(Type|*).(perms)[?query]`.
fn parse_resource_scope(token: &str) -> Option<ResourceScope> {
    let (context, rest) = token.split_once('/')?;
    let context = match context {
        "patient" => ScopeContext::Patient,
        "user" => ScopeContext::User,
        "system" => ScopeContext::System,
        _ => return None,
    };
    let (head, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    let (resource_type, permissions) = head.split_once('.')?;
    let resource_type = match resource_type {
        "*" => None,
        name if is_resource_type_name(name) => Some(name.to_owned()),
        _ => return None,
    };
    let (permissions, is_v2) = match v1_permissions(permissions) {
        Some(v1) => (v1, false),
        None => (v2_permissions(permissions)?, true),
    };
    let constraints = match query {
        None => Vec::new(),
        // Granular constraints are a SMART 2.0 feature (§ "Finer-grained resource constraints
        // using search parameters"); a v1 permission word with a query is not a scope.
        Some(_) if !is_v2 => return None,
        Some(query) => parse_constraints(query)?,
    };
    Some(ResourceScope {
        context,
        resource_type,
        permissions,
        constraints,
    })
}

/// `[A-Z][A-Za-z]+`: the shape of every FHIR R4 resource type name.
fn is_resource_type_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_uppercase()
        && bytes[1..].iter().all(|b| b.is_ascii_alphabetic())
}

/// § "Scopes for requesting FHIR Resources": v1 `.read` ⇒ `.rs`, `.write` ⇒ `.cud`, `.*` ⇒ `.cruds`.
fn v1_permissions(word: &str) -> Option<BTreeSet<Permission>> {
    use Permission::*;
    let permissions: &[Permission] = match word {
        "read" => &[Read, Search],
        "write" => &[Create, Update, Delete],
        "*" => &[Create, Read, Update, Delete, Search],
        _ => return None,
    };
    Some(permissions.iter().copied().collect())
}

/// § "Scopes for requesting FHIR Resources": "Valid suffixes are a subset of the in-order
/// string `.cruds`"; undefined or out-of-order letters make the scope malformed.
fn v2_permissions(letters: &str) -> Option<BTreeSet<Permission>> {
    let mut permissions = BTreeSet::new();
    // Index in CRUDS that the next letter must be at or after.
    let mut next = 0;
    for letter in letters.chars() {
        let offset = CRUDS[next..].iter().position(|(l, _)| *l == letter)?;
        permissions.insert(CRUDS[next + offset].1);
        next += offset + 1;
    }
    if permissions.is_empty() {
        None
    } else {
        Some(permissions)
    }
}

/// § "Finer-grained resource constraints using search parameters": "a query string suffix ...
/// starting with `?` and followed by a series of `param=value` items separated by `&`".
/// `None` if any item is malformed (see the module doc for the rules).
fn parse_constraints(query: &str) -> Option<Vec<(String, String)>> {
    if query.is_empty() {
        return None;
    }
    query.split('&').map(parse_constraint).collect()
}

fn parse_constraint(item: &str) -> Option<(String, String)> {
    if !item.contains('=') || !has_valid_percent_escapes(item) {
        return None;
    }
    // `item` holds no `&` (split off by the caller) and is not empty, so `parse` yields exactly
    // one pair, split at the first `=`, both sides decoded (`+` is a space).
    let (name, value) = form_urlencoded::parse(item.as_bytes()).next()?;
    let name_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    // `item` is printable ASCII (checked per token), so a U+FFFD can only come from a lossy
    // decode of escapes that are not UTF-8. No search value holds control characters either.
    let value_ok = !value.contains(|c: char| c == '\u{FFFD}' || c.is_control());
    if name.is_empty() || value.is_empty() || !name_ok || !value_ok {
        return None;
    }
    Some((name.into_owned(), value.into_owned()))
}

/// Every `%` starts a two-hex-digit escape (the crate would pass a malformed one through).
fn has_valid_percent_escapes(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            match bytes.get(i + 1..i + 3) {
                Some(pair) if pair.iter().all(u8::is_ascii_hexdigit) => i += 3,
                _ => return false,
            }
        } else {
            i += 1;
        }
    }
    true
}

/// A dropped token as it may be logged: characters outside the `scope-token` set escaped, and
/// cut after about [`REPORT_MAX_LEN`] bytes with a note of the original length.
fn for_report(token: &str) -> String {
    let mut report = String::new();
    let mut chars = token.chars();
    for c in chars.by_ref() {
        if c.is_ascii() && is_scope_token_byte(c as u8) {
            report.push(c);
        } else {
            report.extend(c.escape_default());
        }
        if report.len() >= REPORT_MAX_LEN {
            break;
        }
    }
    if chars.next().is_some() {
        report.push_str(&format!("...({} bytes)", token.len()));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Permission::*;
    use ScopeContext::*;

    const ALL_PERMISSIONS: [Permission; 5] = [Create, Read, Update, Delete, Search];
    const ALL_CONTEXTS: [ScopeContext; 3] = [Patient, User, System];

    fn perms(list: &[Permission]) -> BTreeSet<Permission> {
        list.iter().copied().collect()
    }

    /// Parses one scope that must be a resource scope.
    fn one(scope: &str) -> ResourceScope {
        let (scopes, rejected) = Scopes::parse(scope);
        assert!(rejected.is_empty(), "{scope:?} rejected: {rejected:?}");
        assert_eq!(scopes.resources.len(), 1, "{scope:?} → {scopes:?}");
        scopes.resources[0].clone()
    }

    /// Asserts that `scope` is dropped, reported, and grants nothing.
    fn assert_malformed(scope: &str) {
        let (scopes, rejected) = Scopes::parse(scope);
        assert_eq!(scopes, Scopes::default(), "{scope:?} was accepted");
        assert_eq!(
            rejected.len(),
            1,
            "{scope:?} not reported once: {rejected:?}"
        );
        for permission in ALL_PERMISSIONS {
            for resource_type in ["Observation", "Patient", "AuditEvent"] {
                assert_eq!(
                    scopes.grant(&ALL_CONTEXTS, resource_type, permission),
                    ScopeGrant::Denied
                );
            }
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    // ---- v2 permission strings ----

    #[test]
    fn v2_every_in_order_subset_of_cruds_parses_to_exactly_its_letters() {
        for mask in 1u32..32 {
            let chosen: Vec<(char, Permission)> = CRUDS
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, lp)| *lp)
                .collect();
            let letters: String = chosen.iter().map(|(l, _)| *l).collect();
            let scope = one(&format!("patient/Observation.{letters}"));
            assert_eq!(scope.context, Patient);
            assert_eq!(scope.resource_type.as_deref(), Some("Observation"));
            assert_eq!(
                scope.permissions,
                chosen.iter().map(|(_, p)| *p).collect::<BTreeSet<_>>(),
                "letters {letters}"
            );
            assert!(scope.constraints.is_empty());
        }
    }

    #[test]
    fn v2_out_of_order_or_repeated_letters_are_malformed() {
        // `.dus` is the spec's own example of an undefined request.
        for letters in [
            "dus", "sr", "rc", "sd", "scrud", "rr", "rss", "crudsc", "cc", "rsr",
        ] {
            assert_malformed(&format!("patient/Observation.{letters}"));
        }
    }

    #[test]
    fn v2_unknown_letters_case_and_empty_permissions_are_malformed() {
        for letters in [
            "xyz", "rx", "R", "RS", "Rs", "cruds!", "", "rs.", "re", "r*",
        ] {
            assert_malformed(&format!("user/Observation.{letters}"));
        }
    }

    // ---- v1 ----

    #[test]
    fn v1_words_map_to_v2_permissions() {
        assert_eq!(
            one("patient/Observation.read").permissions,
            perms(&[Read, Search])
        );
        assert_eq!(
            one("patient/Observation.write").permissions,
            perms(&[Create, Update, Delete])
        );
        assert_eq!(
            one("patient/Observation.*").permissions,
            perms(&ALL_PERMISSIONS)
        );
        assert_eq!(one("system/*.*").permissions, perms(&ALL_PERMISSIONS));
        assert_eq!(one("system/*.*").resource_type, None);
    }

    #[test]
    fn v1_read_is_not_misread_as_v2_letters() {
        // The spec's warning: `.read` must not become `.rd` (delete).
        let (scopes, _) = Scopes::parse("patient/Observation.read");
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Delete),
            ScopeGrant::Denied
        );
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Search),
            ScopeGrant::Unconstrained
        );
        // `.write` does not imply read.
        let (scopes, _) = Scopes::parse("patient/Observation.write");
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Read),
            ScopeGrant::Denied
        );
    }

    #[test]
    fn v1_variants_and_v1_with_query_are_malformed() {
        for scope in [
            "patient/Observation.Read",
            "patient/Observation.READ",
            "patient/Observation.readwrite",
            "patient/Observation.reads",
            "patient/Observation.**",
            "patient/Observation.read?category=laboratory",
            "patient/Observation.*?category=laboratory",
            "patient/Observation.write?code=1",
        ] {
            assert_malformed(scope);
        }
    }

    #[test]
    fn v1_and_v2_mix_in_one_token() {
        let (scopes, rejected) =
            Scopes::parse("openid patient/Observation.read user/Patient.cu system/*.* launch");
        assert!(rejected.is_empty());
        assert_eq!(
            scopes.resources,
            vec![
                ResourceScope {
                    context: Patient,
                    resource_type: Some("Observation".into()),
                    permissions: perms(&[Read, Search]),
                    constraints: vec![],
                },
                ResourceScope {
                    context: User,
                    resource_type: Some("Patient".into()),
                    permissions: perms(&[Create, Update]),
                    constraints: vec![],
                },
                ResourceScope {
                    context: System,
                    resource_type: None,
                    permissions: perms(&ALL_PERMISSIONS),
                    constraints: vec![],
                },
            ]
        );
        assert_eq!(scopes.other, vec!["openid", "launch"]);
    }

    // ---- contexts and resource types ----

    #[test]
    fn contexts_parse() {
        assert_eq!(one("patient/Observation.r").context, Patient);
        assert_eq!(one("user/Observation.r").context, User);
        assert_eq!(one("system/Observation.r").context, System);
    }

    #[test]
    fn wildcard_type_parses_as_none() {
        let scope = one("patient/*.rs");
        assert_eq!(scope.resource_type, None);
        assert_eq!(scope.permissions, perms(&[Read, Search]));
    }

    #[test]
    fn malformed_shapes_are_dropped_and_reported() {
        for scope in [
            "patient/observation.rs", // lower-case type
            "patient/O.rs",           // too short for a type name
            "patient/Observ-ation.rs",
            "patient/Observation2.rs",
            "patient/**.rs",
            "patient/.rs",
            "Patient/Observation.rs", // context is case-sensitive
            "PATIENT/Observation.rs",
            "foo/Bar.rs",
            "/Observation.rs",
            "patient/Observation",
            "patient/Observation.xyz",
            "patient//Observation.rs",
            "patient/Observation..rs",
            "patient/Observation.rs/extra",
            "patient/Observation.rs.s",
            "patient/Observation/rs",
            "patient",
            "patient/",
            "user/*",
            "system/*.",
            "encounter/Observation.rs",
            "*/Observation.rs",
            "patient/Observation.r\ts", // tab is not a separator and not a scope character
            "patient/Obs\u{e9}rvation.rs",
            "\"patient/Observation.rs\"",
        ] {
            assert_malformed(scope);
        }
    }

    // ---- granular scopes ----

    #[test]
    fn granular_with_literal_and_percent_encoded_pipe() {
        let expected = pairs(&[(
            "category",
            "http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        )]);
        let literal = one("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory");
        assert_eq!(literal.constraints, expected);
        assert_eq!(literal.permissions, perms(&[Read, Search]));
        let encoded = one("patient/Observation.rs?category=http%3A%2F%2Fterminology.hl7.org/CodeSystem/observation-category%7claboratory");
        assert_eq!(encoded.constraints, expected);
    }

    #[test]
    fn granular_multiple_pairs_keep_order_and_names_may_carry_modifiers() {
        let scope = one("user/Observation.rs?category=laboratory&code:in=http://vs.example.org/ValueSet/x&patient.birthdate=1990");
        assert_eq!(
            scope.constraints,
            pairs(&[
                ("category", "laboratory"),
                ("code:in", "http://vs.example.org/ValueSet/x"),
                ("patient.birthdate", "1990"),
            ])
        );
    }

    #[test]
    fn granular_values_follow_form_urlencoded_rules() {
        // `+` is a space in a query string; `%2B` is a plus; `=` after the first is data; an
        // encoded `&` is data, not a separator.
        let scope =
            one("patient/Observation.rs?code=a+b&date=ge2020-01-01T00:00:00%2B01:00&x=1=2&y=a%26b");
        assert_eq!(
            scope.constraints,
            pairs(&[
                ("code", "a b"),
                ("date", "ge2020-01-01T00:00:00+01:00"),
                ("x", "1=2"),
                ("y", "a&b"),
            ])
        );
        let utf8 = one("patient/Observation.rs?code=caf%C3%A9");
        assert_eq!(utf8.constraints, pairs(&[("code", "caf\u{e9}")]));
    }

    #[test]
    fn granular_on_wildcard_type_is_kept() {
        let scope = one(
            "patient/*.rs?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|N",
        );
        assert_eq!(scope.resource_type, None);
        assert_eq!(scope.constraints.len(), 1);
    }

    #[test]
    fn malformed_granular_queries_drop_the_whole_scope() {
        for scope in [
            "patient/Observation.rs?",                       // empty query
            "patient/Observation.rs?category",               // pair without `=`
            "patient/Observation.rs?=laboratory",            // empty name
            "patient/Observation.rs?category=",              // empty value would match everything
            "patient/Observation.rs?category=laboratory&",   // trailing empty item
            "patient/Observation.rs?a=1&&b=2",               // empty item
            "patient/Observation.rs?&a=1",                   // leading empty item
            "patient/Observation.rs?category=lab%zzoratory", // bad escape
            "patient/Observation.rs?category=lab%7",         // truncated escape
            "patient/Observation.rs?category=lab%",          // bare percent
            "patient/Observation.rs?category=%FF%FE",        // not UTF-8
            "patient/Observation.rs?category=lab%0Aoratory", // control character
            "patient/Observation.rs?cat%20egory=x",          // space in a parameter name
            "patient/Observation.rs?cat/egory=x",            // `/` in a parameter name
            "patient/Observation.rs?a%3Db=c",                // encoded `=` in a name
            "patient/Observation.rs??category=x",            // `?` in a name
            "patient/Observation?category=x",                // no permissions
            "patient/Observation.?category=x",               // empty permissions
            "patient/Observation.sr?category=x",             // bad permissions
            "patient/Observation.rs?code=\"x\"",             // `"` is not a scope character
            "patient/Observation.rs?code=a\\b",              // nor is `\`
            "patient/Observation.rs?code=caf\u{e9}",         // non-ASCII must be %-encoded
        ] {
            assert_malformed(scope);
        }
    }

    // ---- other scopes ----

    #[test]
    fn identity_launch_and_refresh_scopes_are_kept_in_other() {
        let input = "openid fhirUser profile launch launch/patient launch/encounter \
                     launch/imagingstudy launch/list?role=https://example.org/med-list-at-home \
                     offline_access online_access";
        let (scopes, rejected) = Scopes::parse(input);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert!(scopes.resources.is_empty());
        assert_eq!(scopes.other, input.split_whitespace().collect::<Vec<_>>());
    }

    #[test]
    fn unknown_non_resource_scopes_are_reported() {
        for scope in [
            "launch/Patient",
            "launch/",
            "launch/patient?role=",
            "launch/list?role=a&role=b",
            "launch/list?role=\u{e9}",
            "launch/list?kind=x",
            "launchpad",
            "OPENID",
            "fhiruser",
            "offline",
            "__custom",
            "https://example.com/scope-name",
            "admin",
            "*",
        ] {
            assert_malformed(scope);
        }
    }

    // ---- whitespace, duplicates and bounds ----

    #[test]
    fn whitespace_runs_are_tolerated_and_empty_input_is_empty() {
        let (scopes, rejected) = Scopes::parse("   openid    patient/Patient.r  ");
        assert!(rejected.is_empty());
        assert_eq!(scopes.other, vec!["openid"]);
        assert_eq!(scopes.resources.len(), 1);
        assert_eq!(Scopes::parse(""), (Scopes::default(), vec![]));
        assert_eq!(Scopes::parse("     "), (Scopes::default(), vec![]));
    }

    #[test]
    fn non_space_whitespace_does_not_separate_scopes() {
        let (scopes, rejected) = Scopes::parse("patient/Patient.r\npatient/Observation.r");
        assert_eq!(scopes, Scopes::default());
        assert_eq!(
            rejected,
            vec!["patient/Patient.r\\npatient/Observation.r".to_string()]
        );
    }

    #[test]
    fn exact_duplicates_are_kept_once() {
        let (scopes, rejected) =
            Scopes::parse("openid openid patient/Patient.r patient/Patient.r patient/Patient.rs");
        assert!(rejected.is_empty());
        assert_eq!(scopes.other, vec!["openid"]);
        assert_eq!(scopes.resources.len(), 2);
    }

    #[test]
    fn reports_keep_valid_siblings_and_list_each_bad_token() {
        let (scopes, rejected) = Scopes::parse(
            "patient/Observation.xyz openid patient/observation.rs patient/Patient.r foo/Bar.rs",
        );
        assert_eq!(
            rejected,
            vec![
                "patient/Observation.xyz",
                "patient/observation.rs",
                "foo/Bar.rs"
            ]
        );
        assert_eq!(scopes.other, vec!["openid"]);
        assert_eq!(scopes.resources, vec![one("patient/Patient.r")]);
    }

    #[test]
    fn scope_length_bound_is_inclusive_at_the_limit() {
        let prefix = "patient/Observation.rs?code=";
        let at_limit = format!("{prefix}{}", "a".repeat(MAX_SCOPE_LEN - prefix.len()));
        assert_eq!(at_limit.len(), MAX_SCOPE_LEN);
        assert_eq!(
            one(&at_limit).constraints[0].1.len(),
            MAX_SCOPE_LEN - prefix.len()
        );

        let over = format!("{at_limit}a");
        let (scopes, rejected) = Scopes::parse(&format!("{over} openid"));
        assert!(scopes.resources.is_empty());
        assert_eq!(scopes.other, vec!["openid"]);
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].len() < 250, "report not cut: {}", rejected[0]);
        assert!(rejected[0].starts_with("patient/Observation.rs?code=aaa"));
        assert!(rejected[0].ends_with("...(1001 bytes)"));
    }

    #[test]
    fn at_most_max_scopes_tokens_are_examined() {
        let types: Vec<String> = (0..MAX_SCOPES + 5)
            .map(|i| {
                // Distinct valid type names: "Ta", "Tb", ... "Taa" ...
                let mut name = String::from("T");
                let mut n = i;
                loop {
                    name.push((b'a' + (n % 26) as u8) as char);
                    n /= 26;
                    if n == 0 {
                        break;
                    }
                }
                name
            })
            .collect();
        let input: Vec<String> = types.iter().map(|t| format!("user/{t}.r")).collect();
        let (scopes, rejected) = Scopes::parse(&input.join(" "));
        assert_eq!(scopes.resources.len(), MAX_SCOPES);
        assert_eq!(
            rejected,
            vec![format!("<5 scope(s) after the first {MAX_SCOPES} ignored>")]
        );
        // The scope past the limit grants nothing.
        assert_eq!(
            scopes.grant(&[User], &types[MAX_SCOPES], Read),
            ScopeGrant::Denied
        );
        assert_eq!(
            scopes.grant(&[User], &types[MAX_SCOPES - 1], Read),
            ScopeGrant::Unconstrained
        );
    }

    #[test]
    fn reports_escape_control_and_non_ascii_characters() {
        let (_, rejected) = Scopes::parse("patient/Obs\u{1b}[31m\u{e9}.rs");
        assert_eq!(
            rejected,
            vec!["patient/Obs\\u{1b}[31m\\u{e9}.rs".to_string()]
        );
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        for input in [
            "?",
            "/",
            ".",
            "&",
            "=",
            "%",
            "patient/*.rs?=",
            "patient/*.rs?%",
            "patient/\u{1F600}.rs",
            "patient/Observation.rs?c=%\u{e9}",
            "launch/?role=x",
            "\u{0}",
            "patient/*.rs?a=%F0%9F%98",
        ] {
            let (scopes, _) = Scopes::parse(input);
            assert!(scopes.resources.is_empty(), "{input:?}");
        }
    }

    // ---- grant ----

    #[test]
    fn grant_unconstrained_wins_over_granular_in_either_order() {
        let granular = "patient/Observation.rs?category=laboratory";
        let plain = "patient/Observation.rs";
        for input in [format!("{granular} {plain}"), format!("{plain} {granular}")] {
            let (scopes, _) = Scopes::parse(&input);
            assert_eq!(
                scopes.grant(&[Patient], "Observation", Read),
                ScopeGrant::Unconstrained,
                "{input}"
            );
        }
        // A wildcard unconstrained scope also wins over a typed granular one.
        let (scopes, _) = Scopes::parse("patient/Observation.rs?category=laboratory patient/*.r");
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Read),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Search),
            ScopeGrant::Constrained(vec![pairs(&[("category", "laboratory")])])
        );
    }

    #[test]
    fn grant_two_granular_scopes_are_ored_each_anded() {
        let (scopes, _) = Scopes::parse(
            "patient/Observation.rs?category=laboratory \
             patient/Observation.s?category=vital-signs&code=http://loinc.org|8867-4 \
             patient/Condition.rs?category=problem-list-item",
        );
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Search),
            ScopeGrant::Constrained(vec![
                pairs(&[("category", "laboratory")]),
                pairs(&[
                    ("category", "vital-signs"),
                    ("code", "http://loinc.org|8867-4")
                ]),
            ])
        );
        // Only the first granular scope carries `r`.
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Read),
            ScopeGrant::Constrained(vec![pairs(&[("category", "laboratory")])])
        );
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Create),
            ScopeGrant::Denied
        );
    }

    #[test]
    fn grant_lists_identical_constraint_sets_once() {
        let (scopes, _) = Scopes::parse(
            "patient/Observation.r?category=laboratory patient/Observation.rs?category=laboratory",
        );
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Read),
            ScopeGrant::Constrained(vec![pairs(&[("category", "laboratory")])])
        );
    }

    #[test]
    fn grant_filters_by_context() {
        let (scopes, _) = Scopes::parse("patient/*.cruds user/AuditEvent.r");
        assert_eq!(
            scopes.grant(&[User], "Observation", Read),
            ScopeGrant::Denied
        );
        assert_eq!(
            scopes.grant(&[System], "Observation", Read),
            ScopeGrant::Denied
        );
        assert_eq!(scopes.grant(&[], "Observation", Read), ScopeGrant::Denied);
        assert_eq!(
            scopes.grant(&[Patient], "Observation", Read),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            scopes.grant(&[User, Patient], "Observation", Read),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            scopes.grant(&[User], "AuditEvent", Read),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            scopes.grant(&[User], "AuditEvent", Search),
            ScopeGrant::Denied
        );
    }

    #[test]
    fn grant_wildcard_applies_to_any_type_but_typed_scope_only_to_its_type() {
        let (scopes, _) = Scopes::parse("system/*.rs user/Observation.c");
        for resource_type in ["Observation", "Patient", "AuditEvent", "Consent", "Zz"] {
            assert_eq!(
                scopes.grant(&[System], resource_type, Read),
                ScopeGrant::Unconstrained,
                "{resource_type}"
            );
        }
        assert_eq!(
            scopes.grant(&[User], "Observation", Create),
            ScopeGrant::Unconstrained
        );
        assert_eq!(scopes.grant(&[User], "Patient", Create), ScopeGrant::Denied);
        // Type names match exactly.
        assert_eq!(
            scopes.grant(&[User], "ObservationX", Create),
            ScopeGrant::Denied
        );
        assert_eq!(
            scopes.grant(&[User], "Observatio", Create),
            ScopeGrant::Denied
        );
    }

    #[test]
    fn grant_denies_non_type_names_even_under_wildcard() {
        let (scopes, _) = Scopes::parse("system/*.cruds");
        for resource_type in ["", "**", "observation", "Observation/1", "..", "Obs%20"] {
            assert_eq!(
                scopes.grant(&[System], resource_type, Read),
                ScopeGrant::Denied,
                "{resource_type:?}"
            );
        }
    }

    #[test]
    fn grant_on_every_type_comes_only_from_wildcard_scopes() {
        let (typed, _) = Scopes::parse("user/Observation.rs user/Patient.cruds");
        assert_eq!(typed.grant(&[User], "*", Search), ScopeGrant::Denied);
        let (wild, _) = Scopes::parse("user/Observation.cruds user/*.s patient/*.rs?_tag=x");
        assert_eq!(wild.grant(&[User], "*", Search), ScopeGrant::Unconstrained);
        assert_eq!(wild.grant(&[User], "*", Read), ScopeGrant::Denied);
        assert_eq!(wild.grant(&[User], "*", Create), ScopeGrant::Denied);
        assert_eq!(
            wild.grant(&[Patient], "*", Read),
            ScopeGrant::Constrained(vec![pairs(&[("_tag", "x")])])
        );
    }

    #[test]
    fn grant_read_search_scope_does_not_escalate_to_writes() {
        let (scopes, _) = Scopes::parse("patient/*.rs user/Observation.rs system/Patient.read");
        for (context, resource_type) in [
            (Patient, "Observation"),
            (User, "Observation"),
            (System, "Patient"),
        ] {
            for write in [Create, Update, Delete] {
                assert_eq!(
                    scopes.grant(&[context], resource_type, write),
                    ScopeGrant::Denied,
                    "{context:?} {resource_type} {write:?}"
                );
            }
            assert_eq!(
                scopes.grant(&[context], resource_type, Read),
                ScopeGrant::Unconstrained
            );
            assert_eq!(
                scopes.grant(&[context], resource_type, Search),
                ScopeGrant::Unconstrained
            );
        }
    }

    #[test]
    fn grant_single_letter_scopes_grant_only_that_letter() {
        for (letter, permission) in CRUDS {
            let (scopes, _) = Scopes::parse(&format!("user/Observation.{letter}"));
            for other in ALL_PERMISSIONS {
                let expected = if other == permission {
                    ScopeGrant::Unconstrained
                } else {
                    ScopeGrant::Denied
                };
                assert_eq!(scopes.grant(&[User], "Observation", other), expected);
            }
        }
    }

    #[test]
    fn grant_ignores_malformed_scopes_next_to_valid_ones() {
        let (scopes, rejected) = Scopes::parse(
            "patient/Observation.rs patient/Observation.sdu patient/observation.cruds \
             patient/Observation.cud?category= patient/Observation.write?x=1 user/*.xyz",
        );
        assert_eq!(rejected.len(), 5);
        for write in [Create, Update, Delete] {
            assert_eq!(
                scopes.grant(&ALL_CONTEXTS, "Observation", write),
                ScopeGrant::Denied
            );
        }
        assert_eq!(scopes.grant(&[User], "Patient", Read), ScopeGrant::Denied);
    }

    #[test]
    fn has_context_reports_resource_scope_contexts_only() {
        let (scopes, _) = Scopes::parse("launch/patient openid patient/Observation.rs");
        assert!(scopes.has_context(Patient));
        assert!(!scopes.has_context(User));
        assert!(!scopes.has_context(System));
        let (scopes, _) = Scopes::parse("launch/patient patient/observation.rs");
        assert!(
            !scopes.has_context(Patient),
            "a malformed scope counts for nothing"
        );
        assert!(!Scopes::default().has_context(System));
    }

    // ---- roles ----

    #[test]
    fn natural_scopes_for_roles_parse_cleanly_and_grant_what_they_say() {
        for role in [
            "practitioner",
            "patient",
            "ehr-system",
            "compliance-officer",
            "admin",
        ] {
            let text = Scopes::natural_for_role(role);
            let (scopes, rejected) = Scopes::parse(text);
            assert!(rejected.is_empty(), "{role}: {rejected:?}");
            assert!(!scopes.resources.is_empty(), "{role}");
            assert_eq!(
                scopes.resources.len() + scopes.other.len(),
                text.split(' ').count(),
                "{role}: every scope understood"
            );
        }

        let (practitioner, _) = Scopes::parse(Scopes::natural_for_role("practitioner"));
        assert_eq!(
            practitioner.grant(&[User], "Patient", Delete),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            practitioner.grant(&[Patient], "Patient", Read),
            ScopeGrant::Denied
        );

        let (patient, _) = Scopes::parse(Scopes::natural_for_role("patient"));
        assert!(patient.has_context(Patient));
        assert!(patient.other.iter().any(|s| s == "launch/patient"));
        assert_eq!(
            patient.grant(&[Patient], "Observation", Search),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            patient.grant(&[Patient], "Observation", Update),
            ScopeGrant::Denied
        );

        let (ehr, _) = Scopes::parse(Scopes::natural_for_role("ehr-system"));
        assert_eq!(
            ehr.grant(&[System], "Encounter", Create),
            ScopeGrant::Unconstrained
        );
        assert_eq!(ehr.grant(&[User], "Encounter", Create), ScopeGrant::Denied);

        let (compliance, _) = Scopes::parse(Scopes::natural_for_role("compliance-officer"));
        assert_eq!(
            compliance.grant(&[User], "AuditEvent", Search),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            compliance.grant(&[User], "Consent", Read),
            ScopeGrant::Unconstrained
        );
        assert_eq!(
            compliance.grant(&[User], "Consent", Update),
            ScopeGrant::Denied
        );
        assert_eq!(
            compliance.grant(&[User], "Observation", Read),
            ScopeGrant::Denied
        );

        let (admin, _) = Scopes::parse(Scopes::natural_for_role("admin"));
        assert!(admin.has_context(User) && admin.has_context(System));
        assert!(!admin.has_context(Patient));
    }

    #[test]
    fn unknown_roles_get_no_scopes() {
        for role in ["", "Admin", "root", "practitioner ", "ehr_system"] {
            assert_eq!(Scopes::natural_for_role(role), "", "{role:?}");
        }
    }

    // ---- properties ----

    /// Permissions some spelling in `input` could legitimately have granted: the v2 letter, or a
    /// v1 word implying it.
    fn could_grant(input: &str, permission: Permission) -> bool {
        let letter = CRUDS.iter().find(|(_, p)| *p == permission).unwrap().0;
        input.contains(letter)
            || input.contains(".*")
            || (matches!(permission, Read | Search) && input.contains(".read"))
            || (matches!(permission, Create | Update | Delete) && input.contains(".write"))
    }

    fn check_no_phantom_permissions(input: &str) -> Result<(), TestCaseError> {
        let (scopes, _) = Scopes::parse(input);
        for permission in ALL_PERMISSIONS {
            if could_grant(input, permission) {
                continue;
            }
            for resource_type in ["Observation", "Patient", "Foo"] {
                prop_assert_eq!(
                    scopes.grant(&ALL_CONTEXTS, resource_type, permission),
                    ScopeGrant::Denied,
                    "{:?} granted {:?} on {}",
                    input,
                    permission,
                    resource_type
                );
            }
        }
        Ok(())
    }

    fn check_invariants(input: &str) -> Result<(), TestCaseError> {
        let (scopes, rejected) = Scopes::parse(input);
        prop_assert!(scopes.resources.len() + scopes.other.len() <= MAX_SCOPES);
        prop_assert!(rejected.len() <= MAX_SCOPES + 1);
        for scope in &scopes.resources {
            prop_assert!(!scope.permissions.is_empty());
            for (name, value) in &scope.constraints {
                prop_assert!(!name.is_empty() && !value.is_empty());
            }
        }
        for report in &rejected {
            prop_assert!(report.len() < 400, "unbounded report {:?}", report);
            prop_assert!(!report.contains(|c: char| c.is_control()));
        }
        Ok(())
    }

    /// Scope-shaped tokens, valid and not.
    fn near_scope() -> impl Strategy<Value = String> {
        (
            "(patient|user|system|Patient|launch|foo)?",
            "(/|//|\\.)?",
            "(Observation|Patient|\\*|observation|O)?",
            "(\\.|\\.\\.|/)?",
            "(read|write|\\*|[cruds*xRS]{0,6})",
            "(\\?([a-z:_]{0,6}(=[a-z|%7C2F]{0,6})?&?){0,3})?",
        )
            .prop_map(|(a, b, c, d, e, f)| format!("{a}{b}{c}{d}{e}{f}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_never_panics_on_arbitrary_strings(input in any::<String>()) {
            check_invariants(&input)?;
            check_no_phantom_permissions(&input)?;
        }

        #[test]
        fn parse_never_panics_on_printable_ascii(input in "[ -~]{0,300}") {
            check_invariants(&input)?;
            check_no_phantom_permissions(&input)?;
        }

        #[test]
        fn near_scopes_never_grant_letters_they_do_not_contain(
            tokens in proptest::collection::vec(near_scope(), 0..6)
        ) {
            let input = tokens.join(" ");
            check_invariants(&input)?;
            check_no_phantom_permissions(&input)?;
        }

        #[test]
        fn valid_v2_scopes_round_trip(
            context in prop_oneof![Just(Patient), Just(User), Just(System)],
            resource_type in prop_oneof![Just(None), "[A-Z][a-zA-Z]{1,20}".prop_map(Some)],
            mask in 1u32..32,
            constraints in proptest::collection::vec(("[a-z][a-z_:.-]{0,10}", "[ -~]{1,20}"), 0..4),
        ) {
            let letters: String = CRUDS
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, (l, _))| *l)
                .collect();
            let prefix = match context {
                Patient => "patient",
                User => "user",
                System => "system",
            };
            let mut scope = format!(
                "{prefix}/{}.{letters}",
                resource_type.as_deref().unwrap_or("*")
            );
            if !constraints.is_empty() {
                let query: Vec<String> = constraints
                    .iter()
                    .map(|(n, v)| {
                        let encoded: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
                        format!("{n}={encoded}")
                    })
                    .collect();
                scope = format!("{scope}?{}", query.join("&"));
            }
            let (scopes, rejected) = Scopes::parse(&scope);
            prop_assert!(rejected.is_empty(), "{:?} rejected", scope);
            let expected = ResourceScope {
                context,
                resource_type: resource_type.clone(),
                permissions: CRUDS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, (_, p))| *p)
                    .collect(),
                constraints: constraints.clone(),
            };
            prop_assert_eq!(&scopes.resources, &vec![expected.clone()]);
            let target = resource_type.as_deref().unwrap_or("Anything");
            for permission in ALL_PERMISSIONS {
                let grant = scopes.grant(&[context], target, permission);
                let expected_grant = if !expected.permissions.contains(&permission) {
                    ScopeGrant::Denied
                } else if constraints.is_empty() {
                    ScopeGrant::Unconstrained
                } else {
                    ScopeGrant::Constrained(vec![constraints.clone()])
                };
                prop_assert_eq!(grant, expected_grant);
            }
        }
    }

    proptest! {
        // Each case parses up to ~140 kB; fewer cases keep the suite fast.
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn many_long_tokens_stay_bounded(
            tokens in proptest::collection::vec("[!-~]{0,1100}", 0..130)
        ) {
            check_invariants(&tokens.join(" "))?;
        }
    }
}
