//! The Casbin policy engine: may a role perform an interaction on a resource type, given the
//! attributes of the request?
//!
//! This is one of the three layers of every decision (SMART scopes ∩ this policy ∩ consent).
//! The model and the policy are two files in the policies directory (`model.conf`,
//! `policy.csv`; `policies/README.md` explains them role by role). The server computes the
//! [`PolicyAttributes`] of a request; Casbin only reads them, once per request and role of the
//! caller, never per result row.
//!
//! Loading is strict because a silently ignored line would change who may do what: Casbin
//! itself skips lines of unknown kinds, only notices a wrong column count or a broken
//! condition when a request hits it, and panics on an unknown effect. So besides Casbin's own
//! parsing, [`PolicyEngine::load`] checks the shape of the model, every policy line (columns,
//! interaction names, resource type names, attribute names in conditions, effects), evaluates
//! every condition once, and probes the real matcher with each line. A file that fails
//! any of this is refused; on [`PolicyEngine::reload`] the policy in force stays in force.
//!
//! Decisions are cached by Casbin's `CachedEnforcer`, whose cache key hashes every request
//! value, the attributes included, so a cached decision never crosses attribute values.
//! Reloading replaces the enforcer, and its cache with it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use casbin::function_map::OperatorFunction;
use casbin::rhai::Dynamic;
use casbin::{CachedApi, CachedEnforcer, DefaultCache};
use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, Model, StringAdapter};

/// File name of the Casbin model inside the policies directory.
pub const MODEL_FILE: &str = "model.conf";
/// File name of the policy lines inside the policies directory.
pub const POLICY_FILE: &str = "policy.csv";

/// The FHIR interactions a policy line may name (besides `*`).
const INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "search",
    "history",
    "create",
    "update",
    "delete",
    // Erasure of a patient's record (`Patient/$erase`).
    "erase",
    // Not a FHIR interaction: may the role override a consent deny in an emergency
    // (`crate::consent::break_glass`)?
    "break-glass",
];

/// The fields of [`PolicyAttributes`], the only names a condition may read from `r.attrs`.
/// A misspelt name would otherwise read as "no value" and quietly never match, which for a
/// deny line means allowing.
const ATTRIBUTE_NAMES: &[&str] = &[
    "in_own_compartment",
    "care_team",
    "outside_compartments",
    "restricted",
    "purpose",
    "same_tenant",
];

/// The shape of the model that this code (and the validation model below) relies on.
const REQUEST_TOKENS: &[&str] = &["r_sub", "r_obj", "r_act", "r_attrs"];
const POLICY_TOKENS: &[&str] = &["p_sub", "p_obj", "p_act", "p_cond", "p_eft"];
/// Deny overrides, as Casbin stores it after escaping `p.` to `p_`.
const DENY_OVERRIDES_EFFECT: &str = "some(where (p_eft == allow)) && !some(where (p_eft == deny))";

/// Evaluates every condition of a policy file without deciding anything: the matcher runs
/// each line's condition and then yields false, so no line ends the scan early, and a
/// condition that fails to parse, reads a missing value or is not boolean is an error.
const CONDITION_CHECK_MODEL: &str = r#"
[request_definition]
r = sub, obj, act, attrs
[policy_definition]
p = sub, obj, act, cond, eft
[policy_effect]
e = !some(where (p.eft == deny))
[matchers]
m = eval(p.cond) && false
"#;

/// How many decisions the enforcer caches. The key space (role × type × interaction ×
/// attributes) is small; this bounds memory should callers send many distinct purposes.
const DECISION_CACHE_CAPACITY: usize = 10_000;

/// How often [`PolicyEngine::watch`] looks at the files' modification times.
const WATCH_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The attributes of one request, computed by the server and read by policy conditions as
/// `r.attrs.<field>`. The field names are part of the policy language: renaming one breaks
/// `policy.csv` (and is refused at load by the attribute-name check).
///
/// `Hash` is what keeps the decision cache honest: the cache key hashes every field.
#[derive(Debug, Clone, Default, serde::Serialize, Hash, PartialEq, Eq)]
pub struct PolicyAttributes {
    /// The resource belongs to the caller's own patient compartment.
    pub in_own_compartment: bool,
    /// The caller (a Practitioner) is on the care team of the resource's patient.
    pub care_team: bool,
    /// The resource belongs to no patient compartment (Practitioner, Organization…).
    pub outside_compartments: bool,
    /// The resource carries a restricted confidentiality or a sensitive-category label.
    pub restricted: bool,
    /// The purpose of use (`TREAT`, `ETREAT`, `HPAYMT`, `HOPERAT`…), or empty.
    /// Policy conditions compare it as data; it is never evaluated as code.
    pub purpose: String,
    /// The resource belongs to the caller's tenant. The model requires it for every line.
    pub same_tenant: bool,
}

/// The policy in force, swappable at run time.
pub struct PolicyEngine {
    /// The directory `load` read, re-read by `reload`.
    dir: PathBuf,
    /// Readers clone the `Arc` and release the lock at once, so a reload never waits for
    /// decisions in flight and decisions never wait for a reload's parsing.
    enforcer: RwLock<Arc<CachedEnforcer>>,
    /// Serialises reloads, so that a slower reload of older files cannot replace a newer one.
    reload_lock: tokio::sync::Mutex<()>,
}

impl PolicyEngine {
    /// Loads `model.conf` + `policy.csv` from `dir`; errors name the file and problem.
    pub async fn load(dir: &Path) -> Result<PolicyEngine, String> {
        let enforcer = build_enforcer(dir).await?;
        Ok(PolicyEngine {
            dir: dir.to_path_buf(),
            enforcer: RwLock::new(Arc::new(enforcer)),
            reload_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Re-reads both files; on any error keeps the current policy and returns the error
    /// (the caller logs it).
    pub async fn reload(&self) -> Result<(), String> {
        let _one_reload_at_a_time = self.reload_lock.lock().await;
        let enforcer = build_enforcer(&self.dir).await?;
        *self
            .enforcer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(enforcer);
        Ok(())
    }

    /// Whether any of `roles` may perform `action` on `resource_type` under `attributes`.
    ///
    /// Each role is decided on its own and one allowing role is enough: a deny line stops
    /// the role it names (or every role, with `*`), so a clinician who is also a patient
    /// keeps their practitioner rights. No roles, no access.
    ///
    /// Fails closed: an evaluation error is a deny, logged without the attribute values.
    pub fn enforce(
        &self,
        roles: &[String],
        resource_type: &str,
        action: &str,
        attributes: &PolicyAttributes,
    ) -> bool {
        let enforcer = Arc::clone(
            &self
                .enforcer
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        roles.iter().any(|role| {
            match enforcer.enforce((role.as_str(), resource_type, action, attributes)) {
                Ok(allowed) => allowed,
                Err(error) => {
                    tracing::error!(
                        role = %role,
                        resource_type,
                        action,
                        %error,
                        "policy evaluation failed; denying"
                    );
                    false
                }
            }
        })
    }

    /// Starts a background task that reloads on SIGHUP and when either file's modification
    /// time changes (polled every 2 s). `dir` is the directory polled; it should be the one
    /// given to [`PolicyEngine::load`], which is the one reloaded. Reload errors are logged
    /// and the policy in force is kept. The task holds the engine weakly and ends once the
    /// engine is dropped. Must be called inside a Tokio runtime.
    pub fn watch(self: Arc<Self>, dir: PathBuf) {
        if dir != self.dir {
            tracing::warn!(
                polled = %dir.display(),
                loaded = %self.dir.display(),
                "policy watch polls a different directory than the one loaded"
            );
        }
        let engine = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(watch_loop(engine, dir));
    }
}

/// The body of [`PolicyEngine::watch`].
async fn watch_loop(engine: Weak<PolicyEngine>, dir: PathBuf) {
    let mut hangups = hangup_signals();
    let mut last_seen = modification_times(&dir).await;
    let mut poll = tokio::time::interval(WATCH_POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reason = tokio::select! {
            _ = poll.tick() => {
                let now_seen = modification_times(&dir).await;
                if now_seen == last_seen {
                    continue;
                }
                // Remember the change even if the reload fails: the error is logged once,
                // and the next edit (or a SIGHUP) tries again.
                last_seen = now_seen;
                "file change"
            }
            _ = next_hangup(&mut hangups) => "SIGHUP",
        };
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match engine.reload().await {
            Ok(()) => tracing::info!(reason, dir = %dir.display(), "policy reloaded"),
            Err(error) => tracing::error!(
                reason,
                %error,
                "policy reload refused; the previous policy stays in force"
            ),
        }
    }
}

#[cfg(unix)]
type HangupSignals = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type HangupSignals = Option<()>;

#[cfg(unix)]
fn hangup_signals() -> HangupSignals {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(signals) => Some(signals),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; policy reloads on file change only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signals() -> HangupSignals {
    None
}

/// Resolves at the next SIGHUP, or never when there is no signal stream.
async fn next_hangup(hangups: &mut HangupSignals) {
    #[cfg(unix)]
    if let Some(signals) = hangups {
        if signals.recv().await.is_some() {
            return;
        }
    }
    let _ = hangups;
    std::future::pending::<()>().await
}

/// The modification times of both files; `None` for a file that cannot be read right now
/// (an editor replacing it), which is then seen as a change when it comes back.
async fn modification_times(dir: &Path) -> [Option<SystemTime>; 2] {
    let modified = |file: &'static str| {
        let path = dir.join(file);
        async move {
            tokio::fs::metadata(path)
                .await
                .and_then(|metadata| metadata.modified())
                .ok()
        }
    };
    [modified(MODEL_FILE).await, modified(POLICY_FILE).await]
}

/// Reads, validates and builds an enforcer from the two files in `dir`.
async fn build_enforcer(dir: &Path) -> Result<CachedEnforcer, String> {
    let model_path = dir.join(MODEL_FILE);
    let policy_path = dir.join(POLICY_FILE);
    let model_text = read_file(&model_path).await?;
    let policy_text = read_file(&policy_path).await?;
    let in_model = |problem: String| format!("{}: {problem}", model_path.display());
    let in_policy = |problem: String| format!("{}: {problem}", policy_path.display());

    let policy_lines = parse_policy_file(&policy_text).map_err(in_policy)?;

    let model = DefaultModel::from_str(&model_text)
        .await
        .map_err(|error| in_model(error.to_string()))?;
    check_model_shape(&model).map_err(in_model)?;

    let mut enforcer = CachedEnforcer::new(model, StringAdapter::new(policy_text))
        .await
        .map_err(|error| in_model(error.to_string()))?;
    enforcer.add_function("oneOf", OperatorFunction::Arg2(one_of));
    enforcer.set_cache(Box::new(DefaultCache::new(DECISION_CACHE_CAPACITY)));

    check_casbin_read_the_same_lines(&enforcer, &policy_lines).map_err(in_policy)?;
    check_conditions_evaluate(&policy_lines)
        .await
        .map_err(in_policy)?;
    probe_matcher(&enforcer, &policy_lines).map_err(in_model)?;
    Ok(enforcer)
}

async fn read_file(path: &Path) -> Result<String, String> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|error| format!("{}: cannot read: {error}", path.display()))
}

/// `oneOf(value, pattern)`: the matcher's helper for the type and interaction columns.
/// `pattern` is `*` or alternatives separated by `|`; matches are whole names, so `read`
/// does not match `vread`.
fn one_of(value: Dynamic, pattern: Dynamic) -> Dynamic {
    let (Ok(value), Ok(pattern)) = (
        value.into_immutable_string(),
        pattern.into_immutable_string(),
    ) else {
        return false.into();
    };
    (pattern == "*" || pattern.split('|').any(|alternative| alternative == value)).into()
}

/// One `p` or `g` line of `policy.csv`, as read by [`parse_policy_file`].
#[derive(Debug)]
struct PolicyLine {
    line_number: usize,
    /// The columns, the leading `p` or `g` included.
    fields: Vec<String>,
}

/// Parses `policy.csv` on its own terms and checks every line. Returns the `p` and `g`
/// lines, to compare with what Casbin read and to probe the matcher with.
fn parse_policy_file(text: &str) -> Result<Vec<PolicyLine>, String> {
    let mut rules = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at_line = |problem: String| format!("line {line_number}: {problem}");
        if line.contains('"') {
            return Err(at_line(
                "double quotes are not supported; write strings in conditions with backticks"
                    .into(),
            ));
        }
        let mut fields = line.split(',').map(str::trim);
        let kind = fields.next().unwrap_or_default();
        let fields: Vec<String> = fields.map(str::to_owned).collect();
        if fields.iter().any(String::is_empty) {
            return Err(at_line("empty column".into()));
        }
        match kind {
            "p" => check_policy_rule(&fields).map_err(at_line)?,
            "g" if fields.len() == 2 => {}
            "g" => {
                return Err(at_line(format!(
                    "a g line has 2 columns (role, inherited role), found {}",
                    fields.len()
                )))
            }
            other => {
                return Err(at_line(format!(
                    "unknown line kind `{other}`: lines start with p or g (or # for a comment)"
                )))
            }
        }
        let mut rule = vec![kind.to_owned()];
        rule.extend(fields);
        rules.push(PolicyLine {
            line_number,
            fields: rule,
        });
    }
    Ok(rules)
}

/// Checks the columns of one `p` line: role, resource types, interactions, condition, effect.
fn check_policy_rule(fields: &[String]) -> Result<(), String> {
    let [_role, resource_types, interactions, condition, effect] = fields else {
        return Err(format!(
            "a p line has 5 columns (role, resource types, interactions, condition, effect), \
             found {} — a comma inside a condition splits it",
            fields.len()
        ));
    };
    if resource_types != "*" {
        for resource_type in resource_types.split('|') {
            let mut chars = resource_type.chars();
            let looks_like_a_type = chars.next().is_some_and(|c| c.is_ascii_uppercase())
                && chars.all(|c| c.is_ascii_alphanumeric());
            if !looks_like_a_type {
                return Err(format!(
                    "`{resource_type}` is not a FHIR resource type (like Observation) nor *"
                ));
            }
        }
    }
    if interactions != "*" {
        for interaction in interactions.split('|') {
            if !INTERACTIONS.contains(&interaction) {
                return Err(format!(
                    "unknown interaction `{interaction}`; use * or {}",
                    INTERACTIONS.join("|")
                ));
            }
        }
    }
    check_condition_names(condition)?;
    if effect != "allow" && effect != "deny" {
        return Err(format!("effect `{effect}` is neither allow nor deny"));
    }
    Ok(())
}

/// Checks that a condition reads only `r.attrs.<known attribute>`.
fn check_condition_names(condition: &str) -> Result<(), String> {
    let bytes = condition.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut index = 0;
    while index < bytes.len() {
        // A reference is r.<...> or p.<...> at the start of a word (as Casbin escapes them).
        let starts_word = index == 0 || !is_word(bytes[index - 1]);
        let is_reference = starts_word
            && matches!(bytes[index], b'r' | b'p')
            && bytes.get(index + 1) == Some(&b'.');
        if !is_reference {
            index += 1;
            continue;
        }
        let end = (index..bytes.len())
            .find(|&at| !(is_word(bytes[at]) || bytes[at] == b'.'))
            .unwrap_or(bytes.len());
        let reference = &condition[index..end];
        let attribute = reference.strip_prefix("r.attrs.");
        if !attribute.is_some_and(|name| ATTRIBUTE_NAMES.contains(&name)) {
            return Err(format!(
                "condition reads `{reference}`; conditions read only r.attrs.{{{}}}",
                ATTRIBUTE_NAMES.join(",")
            ));
        }
        index = end;
    }
    Ok(())
}

/// Checks the model has the request and policy columns this code passes and reads, and the
/// deny-overrides effect (Casbin panics on an effect it does not know).
fn check_model_shape(model: &DefaultModel) -> Result<(), String> {
    let sections = model.get_model();
    let tokens = |section: &str| {
        sections
            .get(section)
            .and_then(|assertions| assertions.get(section))
            .map(|assertion| assertion.tokens.clone())
            .unwrap_or_default()
    };
    if tokens("r") != REQUEST_TOKENS {
        return Err("[request_definition] must be `r = sub, obj, act, attrs`".into());
    }
    if tokens("p") != POLICY_TOKENS {
        return Err("[policy_definition] must be `p = sub, obj, act, cond, eft`".into());
    }
    let effect = sections
        .get("e")
        .and_then(|assertions| assertions.get("e"))
        .map(|assertion| assertion.value.as_str());
    if effect != Some(DENY_OVERRIDES_EFFECT) {
        return Err("[policy_effect] must be deny-overrides: \
             `e = some(where (p.eft == allow)) && !some(where (p.eft == deny))`"
            .into());
    }
    if sections.get("m").and_then(|m| m.get("m")).is_none() {
        return Err("[matchers] has no `m`".into());
    }
    Ok(())
}

/// Casbin parses `policy.csv` with its own rules and skips what it does not understand;
/// make sure it read exactly the rules checked here.
fn check_casbin_read_the_same_lines(
    enforcer: &CachedEnforcer,
    checked: &[PolicyLine],
) -> Result<(), String> {
    let casbin_read: HashSet<Vec<String>> = enforcer
        .get_policy()
        .into_iter()
        .map(|rule| [vec!["p".to_owned()], rule].concat())
        .chain(
            enforcer
                .get_grouping_policy()
                .into_iter()
                .map(|rule| [vec!["g".to_owned()], rule].concat()),
        )
        .collect();
    match checked
        .iter()
        .find(|line| !casbin_read.contains(&line.fields))
    {
        Some(line) => Err(format!(
            "line {}: Casbin read this line differently",
            line.line_number
        )),
        None => Ok(()),
    }
}

/// Evaluates every policy condition against every combination of the boolean attributes,
/// with and without a purpose, so that a condition that does not parse, is not boolean or
/// fails on some branch is refused now rather than denying requests later. One line at a
/// time, so that the error can name it.
async fn check_conditions_evaluate(policy_lines: &[PolicyLine]) -> Result<(), String> {
    let samples: Vec<PolicyAttributes> = (0u8..32)
        .flat_map(|combination| {
            let bit = |n: u8| combination & (1 << n) != 0;
            ["", "ETREAT"].map(|purpose| PolicyAttributes {
                in_own_compartment: bit(0),
                care_team: bit(1),
                outside_compartments: bit(2),
                restricted: bit(3),
                purpose: purpose.to_owned(),
                same_tenant: bit(4),
            })
        })
        .collect();
    for line in policy_lines.iter().filter(|line| line.fields[0] == "p") {
        let model = DefaultModel::from_str(CONDITION_CHECK_MODEL)
            .await
            .map_err(|error| format!("internal condition-check model: {error}"))?;
        // The fields hold no commas or quotes (parse_policy_file refuses them), so joining
        // them gives back the line as Casbin reads it.
        let checker = Enforcer::new(model, StringAdapter::new(line.fields.join(", ")))
            .await
            .map_err(|error| error.to_string())?;
        for sample in &samples {
            checker
                .enforce(("probe", "Patient", "read", sample))
                .map_err(|error| {
                    format!(
                        "line {}: condition `{}` does not evaluate to true/false: {error}",
                        line.line_number, line.fields[4]
                    )
                })?;
        }
    }
    Ok(())
}

/// Runs, for every `p` line, a request that matches its role, type and interaction through
/// the real matcher, with all attributes false and all true: each must answer without an
/// evaluation error, so a misspelt function or attribute in `[matchers]` shows up here and
/// not on a request. (Rhai resolves functions only when a call is reached.)
fn probe_matcher(enforcer: &CachedEnforcer, policy_lines: &[PolicyLine]) -> Result<(), String> {
    let first_alternative = |column: &str, instead_of_any: &'static str| -> String {
        match column {
            "*" => instead_of_any.to_owned(),
            alternatives => alternatives
                .split('|')
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    };
    let all_false = PolicyAttributes {
        same_tenant: true,
        ..PolicyAttributes::default()
    };
    let all_true = PolicyAttributes {
        in_own_compartment: true,
        care_team: true,
        outside_compartments: true,
        restricted: true,
        purpose: "ETREAT".to_owned(),
        same_tenant: true,
    };
    for line in policy_lines.iter().filter(|line| line.fields[0] == "p") {
        let role = first_alternative(&line.fields[1], "probe");
        let resource_type = first_alternative(&line.fields[2], "Patient");
        let action = first_alternative(&line.fields[3], "read");
        for attributes in [&all_false, &all_true] {
            enforcer
                .enforce((
                    role.as_str(),
                    resource_type.as_str(),
                    action.as_str(),
                    attributes,
                ))
                .map_err(|error| format!("[matchers] does not evaluate: {error}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real policy files: `CUSTODIAN_POLICIES_DIR`, or the repository's `policies/`.
    fn policies_dir() -> PathBuf {
        std::env::var_os("CUSTODIAN_POLICIES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")))
    }

    /// Attributes of a request in the caller's tenant, refined by the builder methods below.
    fn tenant() -> PolicyAttributes {
        PolicyAttributes {
            same_tenant: true,
            ..PolicyAttributes::default()
        }
    }

    impl PolicyAttributes {
        fn own(mut self) -> Self {
            self.in_own_compartment = true;
            self
        }
        fn care_team(mut self) -> Self {
            self.care_team = true;
            self
        }
        fn outside(mut self) -> Self {
            self.outside_compartments = true;
            self
        }
        fn restricted(mut self) -> Self {
            self.restricted = true;
            self
        }
        fn purpose(mut self, purpose: &str) -> Self {
            self.purpose = purpose.to_owned();
            self
        }
        fn other_tenant(mut self) -> Self {
            self.same_tenant = false;
            self
        }
    }

    const ALLOW: bool = true;
    const DENY: bool = false;

    /// (role, resource type, interaction, attributes, expected decision)
    #[rustfmt::skip]
    fn decision_table() -> Vec<(&'static str, &'static str, &'static str, PolicyAttributes, bool)>
    {
        vec![
            // practitioner: care-team clinical data, everything but delete.
            ("practitioner", "Observation", "read", tenant().care_team(), ALLOW),
            ("practitioner", "Observation", "vread", tenant().care_team(), ALLOW),
            ("practitioner", "Observation", "search", tenant().care_team(), ALLOW),
            ("practitioner", "Observation", "history", tenant().care_team(), ALLOW),
            ("practitioner", "Observation", "create", tenant().care_team(), ALLOW),
            ("practitioner", "Patient", "update", tenant().care_team(), ALLOW),
            ("practitioner", "Observation", "delete", tenant().care_team(), DENY),
            ("practitioner", "Observation", "read", tenant(), DENY),
            ("practitioner", "Observation", "read", tenant().purpose("TREAT"), DENY),
            ("practitioner", "Observation", "read", tenant().care_team().other_tenant(), DENY),
            // practitioner: shared resources, read-only.
            ("practitioner", "Medication", "read", tenant().outside(), ALLOW),
            ("practitioner", "Organization", "search", tenant().outside(), ALLOW),
            ("practitioner", "Location", "vread", tenant().outside(), ALLOW),
            ("practitioner", "Organization", "history", tenant().outside(), DENY),
            ("practitioner", "Organization", "update", tenant().outside(), DENY),
            ("practitioner", "Organization", "delete", tenant().outside(), DENY),
            // practitioner: restricted data only under break-the-glass, read-only.
            ("practitioner", "Condition", "read", tenant().care_team().restricted(), DENY),
            ("practitioner", "Condition", "read", tenant().care_team().restricted().purpose("TREAT"), DENY),
            ("practitioner", "Condition", "read", tenant().care_team().restricted().purpose("ETREAT"), ALLOW),
            ("practitioner", "*", "break-glass", tenant().purpose("ETREAT"), ALLOW),
            ("practitioner", "Condition", "search", tenant().care_team().restricted().purpose("ETREAT"), ALLOW),
            ("practitioner", "Condition", "update", tenant().care_team().restricted().purpose("ETREAT"), DENY),
            ("practitioner", "Condition", "create", tenant().care_team().restricted().purpose("ETREAT"), DENY),
            ("practitioner", "Condition", "read", tenant().restricted().purpose("ETREAT"), DENY),
            ("practitioner", "Organization", "read", tenant().outside().restricted(), DENY),
            ("practitioner", "Organization", "read", tenant().outside().restricted().purpose("ETREAT"), ALLOW),
            // practitioner: the audit trail, even of their own patients (deny overrides).
            ("practitioner", "AuditEvent", "read", tenant().care_team(), DENY),
            ("practitioner", "AuditEvent", "search", tenant().outside(), DENY),
            // patient: own compartment, read-only, restricted included; Consent writes.
            ("patient", "Observation", "read", tenant().own(), ALLOW),
            ("patient", "Observation", "vread", tenant().own(), ALLOW),
            ("patient", "Observation", "search", tenant().own(), ALLOW),
            ("patient", "Observation", "history", tenant().own(), ALLOW),
            ("patient", "Condition", "read", tenant().own().restricted(), ALLOW),
            ("patient", "Observation", "create", tenant().own(), DENY),
            ("patient", "Observation", "update", tenant().own(), DENY),
            ("patient", "Observation", "delete", tenant().own(), DENY),
            ("patient", "Observation", "read", tenant(), DENY),
            ("patient", "Observation", "read", tenant().care_team(), DENY),
            ("patient", "Observation", "read", tenant().own().other_tenant(), DENY),
            ("patient", "Medication", "read", tenant().outside(), DENY),
            ("patient", "Consent", "create", tenant().own(), ALLOW),
            ("patient", "Consent", "update", tenant().own(), ALLOW),
            ("patient", "Consent", "delete", tenant().own(), ALLOW),
            ("patient", "Consent", "create", tenant(), DENY),
            ("patient", "Consent", "delete", tenant(), DENY),
            ("patient", "*", "break-glass", tenant().purpose("ETREAT"), DENY),
            ("patient", "AuditEvent", "read", tenant().own(), DENY),
            // ehr-system: everything in the tenant, restricted included; no audit trail.
            ("ehr-system", "Observation", "read", tenant(), ALLOW),
            ("ehr-system", "Observation", "delete", tenant(), ALLOW),
            ("ehr-system", "Condition", "update", tenant().restricted(), ALLOW),
            ("ehr-system", "Organization", "create", tenant().outside(), ALLOW),
            ("ehr-system", "Consent", "history", tenant(), ALLOW),
            ("ehr-system", "Observation", "read", tenant().other_tenant(), DENY),
            ("ehr-system", "AuditEvent", "read", tenant(), DENY),
            ("ehr-system", "AuditEvent", "search", tenant().outside(), DENY),
            ("ehr-system", "AuditEvent", "create", tenant(), DENY),
            ("ehr-system", "*", "break-glass", tenant().purpose("ETREAT"), DENY),
            // compliance-officer: audit trail and consents, read-only; no clinical data.
            ("compliance-officer", "AuditEvent", "read", tenant(), ALLOW),
            ("compliance-officer", "AuditEvent", "search", tenant().outside(), ALLOW),
            ("compliance-officer", "AuditEvent", "history", tenant(), ALLOW),
            ("compliance-officer", "Consent", "read", tenant().restricted(), ALLOW),
            ("compliance-officer", "Consent", "search", tenant(), ALLOW),
            ("compliance-officer", "AuditEvent", "create", tenant(), DENY),
            ("compliance-officer", "AuditEvent", "delete", tenant(), DENY),
            ("compliance-officer", "Consent", "update", tenant(), DENY),
            ("compliance-officer", "Observation", "read", tenant(), DENY),
            ("compliance-officer", "Observation", "read", tenant().purpose("HOPERAT"), DENY),
            ("compliance-officer", "AuditEvent", "read", tenant().other_tenant(), DENY),
            // admin: server resources, all interactions; audit trail read-only; no PHI.
            ("admin", "Organization", "create", tenant().outside(), ALLOW),
            ("admin", "Practitioner", "delete", tenant().outside(), ALLOW),
            ("admin", "Location", "update", tenant().outside().restricted(), ALLOW),
            ("admin", "AuditEvent", "read", tenant(), ALLOW),
            ("admin", "AuditEvent", "search", tenant().outside(), ALLOW),
            ("admin", "AuditEvent", "update", tenant().outside(), DENY),
            ("admin", "AuditEvent", "delete", tenant().outside(), DENY),
            ("admin", "Observation", "read", tenant(), DENY),
            ("admin", "Patient", "search", tenant(), DENY),
            ("admin", "Consent", "read", tenant(), DENY),
            ("admin", "Organization", "create", tenant().outside().other_tenant(), DENY),
            // erase (Patient/$erase): compliance-officer only; ehr-system's and admin's broad
            // lines are denied it explicitly, the clinical roles have no line that names it.
            ("compliance-officer", "Patient", "erase", tenant(), ALLOW),
            ("compliance-officer", "Patient", "erase", tenant().restricted(), ALLOW),
            ("compliance-officer", "Patient", "erase", tenant().other_tenant(), DENY),
            ("compliance-officer", "Observation", "erase", tenant(), DENY),
            ("ehr-system", "Patient", "erase", tenant(), DENY),
            ("admin", "Patient", "erase", tenant().outside(), DENY),
            ("practitioner", "Patient", "erase", tenant().care_team(), DENY),
            ("patient", "Patient", "erase", tenant().own(), DENY),
            // Unknown roles have no lines and so no access.
            ("nurse", "Observation", "read", tenant().care_team(), DENY),
            ("", "Observation", "read", tenant().care_team(), DENY),
        ]
    }

    #[tokio::test]
    async fn decisions_follow_the_policy_table() {
        let engine = PolicyEngine::load(&policies_dir()).await.unwrap();
        let table = decision_table();
        assert!(table.len() >= 40);
        let roles = [
            "practitioner",
            "patient",
            "ehr-system",
            "compliance-officer",
            "admin",
        ];
        for role in roles {
            assert!(table.iter().any(|row| row.0 == role), "{role} not covered");
        }
        let mut wrong = Vec::new();
        for (role, resource_type, action, attributes, expected) in &table {
            // Twice: the second answer comes from the decision cache.
            for _ in 0..2 {
                let decision =
                    engine.enforce(&[role.to_string()], resource_type, action, attributes);
                if decision != *expected {
                    wrong.push(format!(
                        "{role} {action} {resource_type} {attributes:?}: expected {expected}, got {decision}"
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{} wrong decisions:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    #[tokio::test]
    async fn any_allowing_role_is_enough_and_no_role_is_a_deny() {
        let engine = PolicyEngine::load(&policies_dir()).await.unwrap();
        let both = ["patient".to_owned(), "practitioner".to_owned()];
        // A clinician who is also a patient keeps practitioner rights over the patient deny...
        assert!(engine.enforce(&both, "Observation", "create", &tenant().care_team()));
        // ...and the AuditEvent denies of both roles still hold.
        assert!(!engine.enforce(&both, "AuditEvent", "read", &tenant().own().care_team()));
        let admin_too = ["practitioner".to_owned(), "admin".to_owned()];
        assert!(engine.enforce(&admin_too, "AuditEvent", "read", &tenant().care_team()));
        assert!(!engine.enforce(&[], "Observation", "read", &tenant().care_team()));
    }

    #[tokio::test]
    async fn site_roles_inherit_through_g_lines() {
        let dir = TempPolicies::copy_of_real_files();
        dir.append_to_policy("g, nurse, practitioner\n");
        let engine = PolicyEngine::load(dir.path()).await.unwrap();
        let nurse = ["nurse".to_owned()];
        assert!(engine.enforce(&nurse, "Observation", "read", &tenant().care_team()));
        // Inherited denies too.
        assert!(!engine.enforce(&nurse, "AuditEvent", "read", &tenant().care_team()));
    }

    #[test]
    fn one_of_matches_whole_alternatives() {
        let check =
            |value: &str, pattern: &str| one_of(value.into(), pattern.into()).as_bool().unwrap();
        assert!(check("read", "*"));
        assert!(check("read", "read"));
        assert!(check("vread", "read|vread"));
        assert!(!check("read", "vread"));
        assert!(!check("Consent", "AuditEvent|ConsentX"));
        assert!(!one_of(1.into(), "*".into()).as_bool().unwrap());
    }

    #[test]
    fn attribute_names_are_the_serialized_fields() {
        let serialized = casbin::rhai::serde::to_dynamic(tenant()).unwrap();
        let map = serialized.cast::<casbin::rhai::Map>();
        let mut fields: Vec<&str> = map.keys().map(|key| key.as_str()).collect();
        let mut expected = ATTRIBUTE_NAMES.to_vec();
        fields.sort_unstable();
        expected.sort_unstable();
        assert_eq!(fields, expected);
    }

    /// A copy of the real policy files in a fresh temporary directory, removed on drop.
    struct TempPolicies(PathBuf);

    impl TempPolicies {
        fn copy_of_real_files() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "custodian-policies-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            for file in [MODEL_FILE, POLICY_FILE] {
                std::fs::copy(policies_dir().join(file), dir.join(file)).unwrap();
            }
            TempPolicies(dir)
        }
        fn path(&self) -> &Path {
            &self.0
        }
        fn read(&self, file: &str) -> String {
            std::fs::read_to_string(self.0.join(file)).unwrap()
        }
        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
        fn append_to_policy(&self, text: &str) {
            let policy = self.read(POLICY_FILE);
            self.write(POLICY_FILE, &format!("{policy}\n{text}"));
        }
    }

    impl Drop for TempPolicies {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Malformed files: (what is wrong, file, edit, words the error must contain).
    #[allow(clippy::type_complexity)]
    #[rustfmt::skip]
    fn malformations() -> Vec<(&'static str, &'static str, Box<dyn Fn(String) -> String>, &'static str)> {
        let append = |line: &'static str| -> Box<dyn Fn(String) -> String> {
            Box::new(move |text| format!("{text}\n{line}\n"))
        };
        vec![
            ("condition that does not parse", POLICY_FILE,
             append("p, patient, *, read, r.attrs.care_team &&, allow"), "does not evaluate"),
            ("condition that is not boolean", POLICY_FILE,
             append("p, patient, *, read, r.attrs.purpose, allow"), "does not evaluate"),
            ("misspelt attribute", POLICY_FILE,
             append("p, patient, *, read, r.attrs.restrcted, deny"), "r.attrs.restrcted"),
            ("attribute outside r.attrs", POLICY_FILE,
             append("p, patient, *, read, r.sub == `admin`, allow"), "r.sub"),
            ("comma inside a condition", POLICY_FILE,
             append("p, patient, *, read, r.attrs.care_team, r.attrs.restricted, allow"), "5 columns"),
            ("missing column", POLICY_FILE,
             append("p, patient, *, read, allow"), "5 columns"),
            ("unknown interaction", POLICY_FILE,
             append("p, patient, *, raed, true, allow"), "raed"),
            ("lower-case resource type", POLICY_FILE,
             append("p, patient, observation, read, true, allow"), "observation"),
            ("unknown effect", POLICY_FILE,
             append("p, patient, *, read, true, permit"), "permit"),
            ("unknown line kind", POLICY_FILE,
             append("P, patient, *, read, true, deny"), "unknown line kind"),
            ("double quotes", POLICY_FILE,
             append("p, patient, *, read, \"true\", allow"), "double quotes"),
            ("g line with 3 columns", POLICY_FILE,
             append("g, nurse, practitioner, tenant"), "2 columns"),
            ("matcher that does not parse", MODEL_FILE,
             Box::new(|text| text.replace("&& oneOf(r.act, p.act)", "&& oneOf(r.act, p.act")), "model.conf"),
            ("matcher calling an unknown function", MODEL_FILE,
             Box::new(|text| text.replace("oneOf(r.act", "oneof(r.act")), "[matchers] does not evaluate"),
            ("effect other than deny-overrides", MODEL_FILE,
             Box::new(|text| text.replace(" && !some(where (p.eft == deny))", "")), "deny-overrides"),
            ("request without attributes", MODEL_FILE,
             Box::new(|text| text.replace("r = sub, obj, act, attrs", "r = sub, obj, act")), "request_definition"),
        ]
    }

    #[tokio::test]
    async fn malformed_files_are_refused_and_the_old_policy_kept() {
        let dir = TempPolicies::copy_of_real_files();
        let engine = PolicyEngine::load(dir.path()).await.unwrap();
        let practitioner = ["practitioner".to_owned()];
        let ehr = ["ehr-system".to_owned()];
        let decisions = |engine: &PolicyEngine| {
            (
                engine.enforce(&practitioner, "Observation", "read", &tenant().care_team()),
                engine.enforce(
                    &practitioner,
                    "Observation",
                    "delete",
                    &tenant().care_team(),
                ),
                engine.enforce(&ehr, "AuditEvent", "read", &tenant()),
            )
        };
        let before = decisions(&engine);
        assert_eq!(before, (ALLOW, DENY, DENY));

        for (what, file, edit, expected_words) in malformations() {
            let original = dir.read(file);
            dir.write(file, &edit(original.clone()));
            let error = engine.reload().await.expect_err(what);
            assert!(
                error.contains(file),
                "{what}: error does not name {file}: {error}"
            );
            assert!(
                error.contains(expected_words),
                "{what}: unexpected error: {error}"
            );
            assert!(
                PolicyEngine::load(dir.path()).await.is_err(),
                "{what}: load accepted it"
            );
            assert_eq!(decisions(&engine), before, "{what}: decisions changed");
            dir.write(file, &original);
        }

        let missing = dir.path().join(MODEL_FILE);
        std::fs::rename(&missing, dir.path().join("moved.conf")).unwrap();
        let error = engine.reload().await.unwrap_err();
        assert!(error.contains("model.conf: cannot read"), "{error}");
        assert_eq!(decisions(&engine), before);
        std::fs::rename(dir.path().join("moved.conf"), &missing).unwrap();

        // A valid change is taken.
        dir.append_to_policy("p, practitioner, Observation, delete, r.attrs.care_team, allow\n");
        engine.reload().await.unwrap();
        assert_eq!(decisions(&engine), (ALLOW, ALLOW, DENY));
    }

    #[tokio::test]
    async fn watch_reloads_when_a_file_changes() {
        let dir = TempPolicies::copy_of_real_files();
        let engine = Arc::new(PolicyEngine::load(dir.path()).await.unwrap());
        Arc::clone(&engine).watch(dir.path().to_path_buf());
        let compliance = ["compliance-officer".to_owned()];
        let reads_observations =
            |engine: &PolicyEngine| engine.enforce(&compliance, "Observation", "read", &tenant());
        assert!(!reads_observations(&engine));

        // Let the watcher record the current modification times before the edit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        dir.append_to_policy("p, compliance-officer, Observation, read, true, allow\n");
        let deadline = tokio::time::Instant::now() + 3 * WATCH_POLL_INTERVAL;
        while !reads_observations(&engine) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "policy change not picked up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rough cost of one decision; run with
    /// `cargo test --release -- --ignored --nocapture enforce_cost`.
    #[tokio::test]
    #[ignore]
    async fn enforce_cost() {
        let engine = PolicyEngine::load(&policies_dir()).await.unwrap();
        let cases = [
            ("practitioner", "Observation", "read", tenant().care_team()),
            (
                "practitioner",
                "Condition",
                "read",
                tenant().care_team().restricted().purpose("ETREAT"),
            ),
            ("patient", "Observation", "search", tenant().own()),
            ("ehr-system", "Observation", "update", tenant()),
            ("admin", "Observation", "read", tenant()),
        ];
        const ROUNDS: u32 = 2_000;
        for (role, resource_type, action, attributes) in cases {
            let roles = [role.to_owned()];
            // Uncached: a distinct purpose per call makes every request a new cache key (it
            // also turns ETREAT into "no emergency", which costs about the same to decide).
            let started = std::time::Instant::now();
            for round in 0..ROUNDS {
                let purpose = format!("{}#{round}", attributes.purpose);
                let attributes = attributes.clone().purpose(&purpose);
                std::hint::black_box(engine.enforce(&roles, resource_type, action, &attributes));
            }
            let uncached = started.elapsed() / ROUNDS;
            let started = std::time::Instant::now();
            for _ in 0..ROUNDS {
                std::hint::black_box(engine.enforce(&roles, resource_type, action, &attributes));
            }
            let cached = started.elapsed() / ROUNDS;
            println!(
                "{role:>18} {action:<7} {resource_type:<12} uncached {:>7.1} µs   cached {:>5.1} µs",
                uncached.as_secs_f64() * 1e6,
                cached.as_secs_f64() * 1e6,
            );
        }
    }
}
