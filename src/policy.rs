//! Per-route rules in CEL (the cel-rust interpreter): an expression over the verified claims and
//! the request that must be `true` for the request to pass.
//!
//! A rule comes from a route's `context_extensions` (`policy: "<expr>"` inline, or `policy_ref:
//! <name>`), or from CONFIG_FILE's `default_policy` for routes that name none. Named rules
//! (CONFIG_FILE `policies`) compile at load: a syntax error is a startup configuration error.
//! Inline expressions compile on first sight into a bounded cache keyed by their text; one that
//! does not compile, or reads claims it may not, answers 500 `bad_route_config`, never an allow.
//!
//! A rule that evaluates to `false`, or fails at run time (a missing claim, a wrong type, a
//! result that is not a bool), denies with 403 `policy_denied`; the error goes to the debug log.
//!
//! Claims: a named rule declares the claims it reads from its syntax tree (`claims.x`,
//! `claims["x"]`, `has(claims.x)`; any other use of `claims` reads every claim). Inline rules
//! are unknown at startup, so what they may read is a setting (`POLICY_INLINE_CLAIMS`), and the
//! verified-token cache keeps those claims; an inline rule reading another claim is a bad
//! route, not a rule that passes on a fresh token and fails on a cached one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};

use cel::common::ast::{Expr, LiteralValue};
use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelTimestamp,
    CelUInt,
};
use cel::common::value::Val;
use cel::{Context, Env, ExecutionError, Program, Value};
use serde_json::Value as Json;
use tracing::debug;

use crate::claims::{Claims, KeptClaims, ReadsClaims};
use crate::metrics::{Metrics, PolicyCounters, PolicyOutcome};
use crate::route::RoutePolicy;

/// The metric label of every inline rule: their text is not a bounded label.
pub const INLINE: &str = crate::metrics::INLINE_RULE;

/// Distinct inline expressions kept compiled. Route tables rarely hold more than a few hundred
/// distinct ones; beyond this the least used are compiled again when next seen (tens of µs).
pub const INLINE_CACHE_ENTRIES: u64 = 1024;

/// Claims held typed ([`Claims`]); every rule may read them, and the cache always keeps them.
const TYPED_CLAIMS: [&str; 8] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid"];

/// The standard CEL environment with our caching `matches`, shared by every rule and every
/// evaluation.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    cel::add_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>, id = "matches")
        .expect("cel is built without its own regex `matches`");
    cel::add_member_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>)
        .expect("cel is built without its own regex `matches`");
    Arc::new(env)
});

/// One compiled rule and what it reads.
pub struct Rule {
    source: String,
    program: Program,
    /// The claims it reads by name (`All` when it uses `claims` as a whole or by a computed key).
    claims: KeptClaims,
    uses_claims: bool,
    /// The `request` fields it reads: only those are built per Check.
    request: FieldReads,
    /// The `source` fields it reads.
    source_peer: FieldReads,
    token: bool,
    now: bool,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Rule").field(&self.source).finish()
    }
}

/// The longest rule accepted, in bytes. Real rules are a line or two.
pub const MAX_RULE_BYTES: usize = 4096;

/// The deepest bracket nesting (`(`, `[`, `{`) accepted in a rule's text.
const MAX_BRACKET_NESTING: usize = 32;

/// The most operators, member selections and calls a rule may hold: each can add a level to the
/// parser's recursion, which overflows a thread's stack long before the text limit.
const MAX_OPERATORS: usize = 256;

/// The deepest syntax tree accepted: the interpreter recurses once a level, on the Check's own
/// worker thread.
const MAX_TREE_DEPTH: usize = 48;

/// The deepest nesting of macros that loop (`all`, `exists`, `exists_one`, `map`, `filter`): each
/// level multiplies the steps an evaluation takes, and an evaluation cannot be interrupted.
const MAX_LOOP_NESTING: usize = 2;

/// The stack of the thread that parses a rule. The parser recurses deeply per level (over
/// 100 KiB a bracket in a debug build); only address space is reserved, pages are touched as
/// used.
const COMPILE_STACK_BYTES: usize = 64 << 20;

impl Rule {
    /// Compiles `source`; `Err` says why it is refused (its size or shape, or the parser's
    /// message). Parsing runs on a thread of its own with a large stack, so no rule text can
    /// overflow the caller's stack (a crash of the whole sidecar); the caller waits for it.
    pub fn compile(source: &str) -> Result<Rule, String> {
        check_text(source)?;
        let owned = source.to_owned();
        std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn(move || Rule::compile_here(owned))
            .map_err(|e| format!("cannot start the rule compiler: {e}"))?
            .join()
            .unwrap_or_else(|_| Err("the CEL parser panicked on it".into()))
    }

    fn compile_here(source: String) -> Result<Rule, String> {
        let program = ENV.compile(&source).map_err(|e| e.to_string())?;
        check_tree(&program.expression().expr, 1, 0)?;
        let mut claims = FieldReads::of("claims");
        claims.walk(&program.expression().expr);
        let mut request = FieldReads::of("request");
        request.walk(&program.expression().expr);
        let mut source_peer = FieldReads::of("source");
        source_peer.walk(&program.expression().expr);
        let references = program.references();
        Ok(Rule {
            source,
            claims: match claims.whole {
                true => KeptClaims::All,
                false => KeptClaims::Named(claims.names),
            },
            uses_claims: references.has_variable("claims"),
            request,
            source_peer,
            token: references.has_variable("token"),
            now: references.has_variable("now"),
            program,
        })
    }

    /// The claims it reads beyond the typed ones, if every one is among `allowed`.
    fn reads_only(&self, allowed: &HashSet<String>) -> Result<(), String> {
        match &self.claims {
            KeptClaims::All => Err("it reads `claims` as a whole or by a computed key".into()),
            KeptClaims::Named(names) => match names
                .iter()
                .find(|n| !allowed.contains(*n) && !TYPED_CLAIMS.contains(&n.as_str()))
            {
                Some(name) => Err(format!(
                    "it reads the claim {name:?}, which POLICY_INLINE_CLAIMS does not list"
                )),
                None => Ok(()),
            },
        }
    }
}

/// Refuses a rule by its text before the parser sees it: too long, too deeply bracketed, or with
/// too many operators. One pass, no recursion; string literals are skipped.
fn check_text(source: &str) -> Result<(), String> {
    if source.len() > MAX_RULE_BYTES {
        return Err(format!(
            "it is {} bytes long; at most {MAX_RULE_BYTES} are accepted",
            source.len()
        ));
    }
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut bytes = source.bytes().peekable();
    while let Some(b) = bytes.next() {
        if let Some(q) = quote {
            match b {
                b'\\' => {
                    bytes.next();
                }
                _ if b == q => quote = None,
                _ => {}
            }
            continue;
        }
        match b {
            b'\'' | b'"' => quote = Some(b),
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                operators += 1;
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'.' | b'!' | b'-' | b'+' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' | b'&' | b'|'
            | b'?' => operators += 1,
            _ => {}
        }
    }
    if deepest > MAX_BRACKET_NESTING {
        return Err(format!(
            "its brackets nest {deepest} deep; at most {MAX_BRACKET_NESTING} are accepted"
        ));
    }
    if operators > MAX_OPERATORS {
        return Err(format!(
            "it holds {operators} operators, brackets and member selections; at most \
             {MAX_OPERATORS} are accepted"
        ));
    }
    Ok(())
}

/// Refuses a parsed rule whose tree is too deep to evaluate on a Check worker's stack, or whose
/// looping macros nest too deep to finish in time. Runs on the compile thread.
fn check_tree(expr: &Expr, depth: usize, loops: usize) -> Result<(), String> {
    if depth > MAX_TREE_DEPTH {
        return Err(format!(
            "its syntax tree is over {MAX_TREE_DEPTH} levels deep"
        ));
    }
    let next = depth + 1;
    match expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Ok(()),
        Expr::Select(select) => check_tree(&select.operand.expr, next, loops),
        Expr::Call(call) => {
            let target = call.target.iter().map(|t| &**t);
            for arg in target.chain(&call.args) {
                check_tree(&arg.expr, next, loops)?;
            }
            Ok(())
        }
        Expr::List(list) => {
            for element in &list.elements {
                check_tree(&element.expr, next, loops)?;
            }
            Ok(())
        }
        Expr::Map(map) => entries(&map.entries, next, loops),
        Expr::Struct(object) => entries(&object.entries, next, loops),
        Expr::Comprehension(c) => {
            if loops + 1 > MAX_LOOP_NESTING {
                return Err(format!(
                    "its looping macros (all, exists, map, filter, ...) nest over \
                     {MAX_LOOP_NESTING} deep"
                ));
            }
            check_tree(&c.iter_range.expr, next, loops)?;
            check_tree(&c.accu_init.expr, next, loops)?;
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                check_tree(&part.expr, next, loops + 1)?;
            }
            Ok(())
        }
    }
}

fn entries(
    entries: &[cel::common::ast::IdedEntryExpr],
    depth: usize,
    loops: usize,
) -> Result<(), String> {
    use cel::common::ast::EntryExpr;
    for entry in entries {
        match &entry.expr {
            EntryExpr::StructField(field) => check_tree(&field.value.expr, depth, loops)?,
            EntryExpr::MapEntry(pair) => {
                check_tree(&pair.key.expr, depth, loops)?;
                check_tree(&pair.value.expr, depth, loops)?;
            }
        }
    }
    Ok(())
}

/// The fields of one variable (`claims`, `request`) a syntax tree reads: constant field
/// selections and indexes on it.
struct FieldReads {
    root: &'static str,
    names: HashSet<String>,
    /// The variable used any other way (passed whole, `in claims`, a computed key, shadowed).
    whole: bool,
}

impl FieldReads {
    fn of(root: &'static str) -> Self {
        FieldReads {
            root,
            names: HashSet::new(),
            whole: false,
        }
    }

    /// Whether the field is read (every field is, when the variable is used whole).
    fn reads(&self, field: &str) -> bool {
        self.whole || self.names.contains(field)
    }

    fn used(&self) -> bool {
        self.whole || !self.names.is_empty()
    }

    fn walk(&mut self, expr: &Expr) {
        let root = self.root;
        let is_root = |e: &Expr| matches!(e, Expr::Ident(name) if name == root);
        match expr {
            Expr::Ident(name) if name == root => self.whole = true,
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
            Expr::Select(select) if is_root(&select.operand.expr) => {
                self.names.insert(select.field.clone());
            }
            Expr::Select(select) => self.walk(&select.operand.expr),
            Expr::Call(call) => {
                if call.func_name == cel::common::ast::operators::INDEX
                    && call.target.is_none()
                    && call.args.len() == 2
                    && is_root(&call.args[0].expr)
                    && let Expr::Literal(LiteralValue::String(name)) = &call.args[1].expr
                {
                    self.names.insert(name.inner().to_owned());
                    return;
                }
                if let Some(target) = &call.target {
                    self.walk(&target.expr);
                }
                for arg in &call.args {
                    self.walk(&arg.expr);
                }
            }
            Expr::Comprehension(c) => {
                for part in [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ] {
                    self.walk(&part.expr);
                }
            }
            Expr::List(list) => list.elements.iter().for_each(|e| self.walk(&e.expr)),
            Expr::Map(_) | Expr::Struct(_) => {
                // Literals of maps and structs: rare in a rule; read everything to stay safe.
                self.whole = true;
            }
        }
    }
}

/// What inline `policy` expressions may read (`POLICY_INLINE_CLAIMS`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InlinePolicies {
    /// Empty: a route with an inline `policy` answers 500 `bad_route_config`.
    #[default]
    Off,
    /// `*`: any claim; the verified-token cache keeps every claim.
    AnyClaim,
    /// These claims (and the typed ones); the cache keeps them.
    Claims(HashSet<String>),
}

impl InlinePolicies {
    /// `POLICY_INLINE_CLAIMS`: empty (off), `*`, or comma-separated claim names.
    pub fn parse(value: &str) -> Result<Self, String> {
        Ok(match value.trim() {
            "" => InlinePolicies::Off,
            "*" => InlinePolicies::AnyClaim,
            names => InlinePolicies::Claims(
                crate::config::parse::split_list(names)
                    .into_iter()
                    .collect(),
            ),
        })
    }
}

/// The configured rules, compiled at load.
#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    pub rules: HashMap<String, Arc<Rule>>,
    /// The rule for routes that name none.
    pub default: Option<String>,
    pub inline: InlinePolicies,
}

impl PolicyConfig {
    /// Compiles CONFIG_FILE's `policies` (name -> expression) and checks `default_policy`
    /// names one of them; every problem is reported.
    pub fn build(
        policies: impl IntoIterator<Item = (String, String)>,
        default: Option<String>,
        inline: InlinePolicies,
    ) -> Result<PolicyConfig, Vec<String>> {
        let mut problems = Vec::new();
        let mut rules = HashMap::new();
        for (name, source) in policies {
            if name == "none" || name == INLINE || name.is_empty() {
                problems.push(format!(
                    "policies: {name:?} is reserved (`none` switches a route's rule off, \
                     `inline` labels inline rules)"
                ));
                continue;
            }
            match Rule::compile(&source) {
                Ok(rule) => {
                    rules.insert(name, Arc::new(rule));
                }
                Err(error) => {
                    problems.push(format!("policies: {name:?} does not compile: {error}"))
                }
            }
        }
        if let Some(name) = &default
            && !rules.contains_key(name)
            && !problems.iter().any(|p| p.contains(&format!("{name:?}")))
        {
            problems.push(format!("default_policy: {name:?} is not one of `policies`"));
        }
        match problems.is_empty() {
            true => Ok(PolicyConfig {
                rules,
                default,
                inline,
            }),
            false => Err(problems),
        }
    }
}

impl ReadsClaims for PolicyConfig {
    fn claims_read(&self) -> KeptClaims {
        let mut names = match &self.inline {
            InlinePolicies::AnyClaim => return KeptClaims::All,
            InlinePolicies::Off => HashSet::new(),
            InlinePolicies::Claims(names) => names.clone(),
        };
        for rule in self.rules.values() {
            match &rule.claims {
                KeptClaims::All => return KeptClaims::All,
                KeptClaims::Named(read) => names.extend(read.iter().cloned()),
            }
        }
        KeptClaims::Named(names)
    }
}

/// What a rule sees of the request, read from Envoy's CheckRequest by `check`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The raw request target, query included, as Envoy sends it.
    pub path: &'a str,
    pub host: &'a str,
    /// Lower-case names; repeated headers joined by `,` (Envoy's doing).
    pub headers: Option<&'a HashMap<String, String>>,
    /// The downstream peer's IP, and port.
    pub source_address: Option<&'a str>,
    pub source_port: Option<u32>,
    /// The client certificate's URI SAN, else DNS SAN, else subject (TLS only).
    pub source_principal: &'a str,
    /// The URL-encoded PEM client certificate (`include_peer_certificate`).
    pub source_certificate: &'a str,
}

/// Why a rule did not let the request pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// `false`, or a run-time error: 403 `policy_denied`.
    Denied,
    /// The route names an unknown rule, or its inline expression is unusable: 500.
    BadRoute(String),
}

/// The rules at run time, with their counters.
pub struct Policies {
    rules: HashMap<String, (Arc<Rule>, PolicyCounters)>,
    default: Option<String>,
    inline: InlinePolicies,
    /// Inline expressions by their text, compiled or refused. A moka cache (already used by the
    /// token cache): concurrent reads without a lock, and a bound with frequency-aware eviction.
    inline_rules: moka::sync::Cache<String, Arc<Result<Rule, String>>>,
    inline_counters: PolicyCounters,
}

impl Policies {
    pub fn new(config: &PolicyConfig, metrics: &Metrics) -> Policies {
        Policies {
            rules: config
                .rules
                .iter()
                .map(|(name, rule)| {
                    let counters = metrics.policy_counters(name);
                    (name.clone(), (rule.clone(), counters))
                })
                .collect(),
            default: config.default.clone(),
            inline: config.inline.clone(),
            inline_rules: moka::sync::Cache::new(INLINE_CACHE_ENTRIES),
            inline_counters: metrics.policy_counters(INLINE),
        }
    }

    /// Runs the route's rule (or the default) over the claims and the request. `now` is unix
    /// seconds. `Ok` when there is no rule or it is `true`.
    pub fn check(
        &self,
        choice: &RoutePolicy<'_>,
        claims: &Claims,
        request: &RequestFacts<'_>,
        now: i64,
    ) -> Result<(), PolicyRefusal> {
        let named = |name: &str| {
            self.rules
                .get_key_value(name)
                .map(|(name, (rule, counters))| (name.as_str(), &**rule, counters))
        };
        let inline;
        let (name, rule, counters) = match choice {
            RoutePolicy::None => return Ok(()),
            RoutePolicy::Default => match self.default.as_deref() {
                None => return Ok(()),
                Some(name) => named(name).expect("config checked the default names a rule"),
            },
            RoutePolicy::Named(name) => named(name).ok_or_else(|| {
                PolicyRefusal::BadRoute(format!(
                    "policy_ref {name:?} is not one of CONFIG_FILE's policies"
                ))
            })?,
            RoutePolicy::Inline(source) => {
                inline = self.inline_rule(source)?;
                let rule = inline.as_ref().as_ref().map_err(|problem| {
                    PolicyRefusal::BadRoute(format!("policy {source:?}: {problem}"))
                })?;
                (INLINE, rule, &self.inline_counters)
            }
        };
        let (outcome, error) = match evaluate(rule, claims, request, now) {
            Ok(Value::Bool(true)) => (PolicyOutcome::Allow, None),
            Ok(Value::Bool(false)) => (PolicyOutcome::Deny, None),
            Ok(other) => (
                PolicyOutcome::Error,
                Some(format!("the result is {other:?}, not a bool")),
            ),
            Err(error) => (PolicyOutcome::Error, Some(error.to_string())),
        };
        counters.count(outcome);
        match outcome {
            PolicyOutcome::Allow => Ok(()),
            _ => {
                debug!(
                    rule = name,
                    outcome = outcome.label(),
                    error,
                    "policy denied"
                );
                Err(PolicyRefusal::Denied)
            }
        }
    }

    /// The name of the rule a route runs (a CONFIG_FILE name, or `inline`); `None`: no rule.
    pub fn rule_name<'a>(&'a self, choice: &RoutePolicy<'a>) -> Option<&'a str> {
        match choice {
            RoutePolicy::None => None,
            RoutePolicy::Default => self.default.as_deref(),
            RoutePolicy::Named(name) => Some(name),
            RoutePolicy::Inline(_) => Some(INLINE),
        }
    }

    /// The compiled inline rule for this text (from the cache, or compiled now), or why it is
    /// refused.
    fn inline_rule(&self, source: &str) -> Result<Arc<Result<Rule, String>>, PolicyRefusal> {
        if self.inline == InlinePolicies::Off {
            return Err(PolicyRefusal::BadRoute(
                "an inline `policy` needs POLICY_INLINE_CLAIMS set (or use `policy_ref`)".into(),
            ));
        }
        if let Some(rule) = self.inline_rules.get(source) {
            return Ok(rule);
        }
        let compiled = Rule::compile(source).and_then(|rule| match &self.inline {
            InlinePolicies::Claims(allowed) => rule.reads_only(allowed).map(|()| rule),
            _ => Ok(rule),
        });
        let compiled = Arc::new(compiled);
        self.inline_rules
            .insert(source.to_owned(), compiled.clone());
        Ok(compiled)
    }
}

/// A CEL value as the interpreter holds it, borrowing the Check's claims and request: the rule
/// reads them in place, with no copy into an intermediate map.
type Bound<'v> = Box<dyn Val + 'v>;

/// Binds only the variables the rule names, then runs it.
fn evaluate(
    rule: &Rule,
    claims: &Claims,
    request: &RequestFacts<'_>,
    now: i64,
) -> Result<Value, cel::ExecutionError> {
    let mut context = Context::with_env(ENV.clone());
    if rule.uses_claims {
        context.add_variable_as_val("claims", claims_value(claims, &rule.claims));
    }
    if rule.request.used() {
        context.add_variable_as_val("request", request_value(request, &rule.request)?);
    }
    if rule.source_peer.used() {
        context.add_variable_as_val("source", source_value(request, &rule.source_peer));
    }
    if rule.token {
        let scopes: Vec<Bound> = claims.scopes().map(string).collect();
        context.add_variable_as_val("token", map([("scopes", list(scopes))]));
    }
    if rule.now {
        let time = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
        context.add_variable_as_val("now", Box::new(CelTimestamp::from(time.fixed_offset())));
    }
    rule.program.execute(&context)
}

fn string(text: &str) -> Bound<'_> {
    Box::new(CelString::from(text))
}

fn int<'v>(value: i64) -> Bound<'v> {
    Box::new(CelInt::from(value))
}

fn list(items: Vec<Bound<'_>>) -> Bound<'_> {
    Box::new(CelList::from(items))
}

fn map<'v>(entries: impl IntoIterator<Item = (&'v str, Bound<'v>)>) -> Bound<'v> {
    let map: HashMap<CelMapKey<'v>, Bound<'v>> = entries
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(map))
}

/// A typed claim ([`TYPED_CLAIMS`]) from its typed field: the same on a fresh and a cached
/// token (`aud` always a list). `None`: the token has none.
fn typed_claim<'v>(claims: &'v Claims, name: &str) -> Option<Bound<'v>> {
    Some(match name {
        "iss" => string(claims.iss.as_deref()?),
        "sub" => string(claims.sub.as_deref()?),
        "jti" => string(claims.jti.as_deref()?),
        "sid" => string(claims.sid.as_deref()?),
        "exp" => int(claims.exp?),
        "nbf" => int(claims.nbf?),
        "iat" => int(claims.iat?),
        "aud" if claims.aud.is_empty() => return None,
        "aud" => list(claims.aud.iter().map(|a| string(a)).collect()),
        _ => return None,
    })
}

/// The claims as a CEL map: those the rule reads (all when it reads all).
fn claims_value<'v>(claims: &'v Claims, reads: &'v KeptClaims) -> Bound<'v> {
    let claim = |name: &'v str| -> Option<(&'v str, Bound<'v>)> {
        let value = match TYPED_CLAIMS.contains(&name) {
            true => typed_claim(claims, name)?,
            false => json_value(claims.all.get(name)?),
        };
        Some((name, value))
    };
    match reads {
        KeptClaims::All => {
            let untyped = (claims.all.iter())
                .filter(|(name, _)| !TYPED_CLAIMS.contains(&name.as_str()))
                .map(|(name, value)| (name.as_str(), json_value(value)));
            map(TYPED_CLAIMS.into_iter().filter_map(claim).chain(untyped))
        }
        KeptClaims::Named(names) => map(names.iter().map(String::as_str).filter_map(claim)),
    }
}

fn json_value(value: &Json) -> Bound<'_> {
    match value {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => int(i),
            (None, Some(u)) => Box::new(CelUInt::from(u)),
            _ => Box::new(CelDouble::from(n.as_f64().unwrap_or_default())),
        },
        Json::String(s) => string(s),
        Json::Array(items) => list(items.iter().map(json_value).collect()),
        Json::Object(fields) => map(fields.iter().map(|(k, v)| (k.as_str(), json_value(v)))),
    }
}

/// The `request` map, with only the fields the rule reads (headers and the query are the
/// costly ones: a map each, built per Check).
/// The most path segments, headers or query parameters a rule is shown. A rule may loop over
/// them, two loops deep, on the Check's worker: this keeps that under ~65,000 steps whatever the
/// client sends (a 60 KiB path holds 20,000 segments). A request with more is not shown to the
/// rule at all: it fails at run time, so the rule denies.
pub const MAX_REQUEST_ITEMS: usize = 256;

fn too_many(what: &str, count: usize) -> ExecutionError {
    ExecutionError::FunctionError {
        function: "request".into(),
        message: format!(
            "the request has {count} {what}; rules see requests with at most \
             {MAX_REQUEST_ITEMS}"
        ),
    }
}

fn request_value<'v>(
    request: &RequestFacts<'v>,
    fields: &FieldReads,
) -> Result<Bound<'v>, ExecutionError> {
    let (path, query) = request.path.split_once('?').unwrap_or((request.path, ""));
    let mut out: Vec<(&str, Bound<'v>)> = Vec::with_capacity(6);
    if fields.reads("method") {
        out.push(("method", string(request.method)));
    }
    if fields.reads("path") {
        out.push(("path", string(request.path)));
    }
    if fields.reads("host") {
        out.push(("host", string(request.host)));
    }
    if fields.reads("path_segments") {
        let segments = path_segments(path);
        if segments.len() > MAX_REQUEST_ITEMS {
            return Err(too_many("path segments", segments.len()));
        }
        out.push((
            "path_segments",
            list(segments.into_iter().map(string).collect()),
        ));
    }
    if fields.reads("headers") {
        let count = request.headers.map_or(0, HashMap::len);
        if count > MAX_REQUEST_ITEMS {
            return Err(too_many("headers", count));
        }
        let headers = request.headers.into_iter().flatten();
        out.push((
            "headers",
            map(headers.map(|(k, v)| (k.as_str(), string(v)))),
        ));
    }
    if fields.reads("query") {
        let count = query.split('&').filter(|p| !p.is_empty()).count();
        if count > MAX_REQUEST_ITEMS {
            return Err(too_many("query parameters", count));
        }
        let mut params: HashMap<CelMapKey<'v>, Bound<'v>> = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            // The first of repeated keys wins.
            params
                .entry(CelMapKey::from(percent_decode(key)))
                .or_insert_with(|| Box::new(CelString::from(percent_decode(value))));
        }
        out.push(("query", Box::new(CelMap::from(params))));
    }
    Ok(map(out))
}

fn source_value<'v>(request: &RequestFacts<'v>, fields: &FieldReads) -> Bound<'v> {
    let mut out = vec![
        ("address", string(request.source_address.unwrap_or(""))),
        ("port", int(request.source_port.map_or(0, i64::from))),
        ("principal", string(request.source_principal)),
        ("certificate", string(request.source_certificate)),
    ];
    // A hash per Check only for the rules that read it.
    if fields.reads("certificate_sha256") {
        let thumbprint = crate::binding::certificate_thumbprint(request.source_certificate);
        let value: Bound<'v> = Box::new(CelString::from(thumbprint.unwrap_or_default()));
        out.push(("certificate_sha256", value));
    }
    map(out)
}

/// `matches(text, pattern)`, with compiled patterns kept by their text: cel's own compiles
/// the regex on every call (tens of µs). The regex crate matches in linear time; a pattern
/// whose compiled form would pass [`REGEX_SIZE_LIMIT`] is an error (the rule denies).
fn matches(text: &CelString<'_>, pattern: &CelString<'_>) -> Result<CelBool, ExecutionError> {
    let compiled = REGEXES.get_with_by_ref(pattern.inner(), || {
        regex::RegexBuilder::new(pattern.inner())
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    match compiled {
        Ok(regex) => Ok(CelBool::from(regex.is_match(text.inner()))),
        Err(error) => Err(ExecutionError::FunctionError {
            function: "matches".into(),
            message: format!("{:?} is not a usable regex: {error}", pattern.inner()),
        }),
    }
}

/// Compiled `matches` patterns kept; rules hold a handful, so this bounds only abuse (inline
/// rules are capped by [`INLINE_CACHE_ENTRIES`] too).
const REGEX_CACHE_ENTRIES: u64 = 1024;

/// The largest compiled regex accepted, in bytes (the regex crate's default is 10 MiB).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

static REGEXES: LazyLock<moka::sync::Cache<String, Result<Arc<regex::Regex>, String>>> =
    LazyLock::new(|| moka::sync::Cache::new(REGEX_CACHE_ENTRIES));

/// The path's segments as an upstream that normalises would see them: empty segments dropped
/// (`//`), `.` dropped and `..` removing the one before, in plain or percent-encoded form, so
/// `/t/acme/../other` is `["t", "other"]`, never `acme` at index 1. Otherwise undecoded.
pub fn path_segments(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        let dots = segment.to_ascii_lowercase().replace("%2e", ".");
        match dots.as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(segment),
        }
    }
    out
}

/// `%XX` escapes and `+` as a space (form encoding); a bad escape is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(rule: &str) -> KeptClaims {
        Rule::compile(rule).unwrap().claims
    }

    fn named(list: &[&str]) -> KeptClaims {
        KeptClaims::Named(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_rule_declares_the_claims_it_reads() {
        assert_eq!(names("claims.tenant == 'a'"), named(&["tenant"]));
        assert_eq!(
            names("'admin' in claims.roles && claims['email'].endsWith('x')"),
            named(&["roles", "email"])
        );
        assert_eq!(
            names("has(claims.org) && claims.org.id == 1"),
            named(&["org"])
        );
        assert_eq!(names("request.method == 'GET'"), named(&[]));
        let request = Rule::compile("request.method == 'GET' && request['path'] != ''")
            .unwrap()
            .request;
        assert!(request.reads("method") && request.reads("path") && !request.reads("headers"));
        assert!(
            Rule::compile("size(request) > 0")
                .unwrap()
                .request
                .reads("headers")
        );
        assert!(!Rule::compile("true").unwrap().request.used());
        for whole in [
            "'tenant' in claims",
            "claims[request.headers['x']] == 'y'",
            "size(claims) > 2",
            "[1].all(claims, claims > 0)",
        ] {
            assert_eq!(names(whole), KeptClaims::All, "{whole}");
        }
    }

    #[test]
    fn paths_are_cut_into_normalised_segments() {
        assert_eq!(
            path_segments("/tenants/acme/orders"),
            ["tenants", "acme", "orders"]
        );
        assert_eq!(path_segments("//tenants//acme/"), ["tenants", "acme"]);
        assert_eq!(path_segments("/t/acme/../other"), ["t", "other"]);
        assert_eq!(
            path_segments("/t/acme/%2E%2e/other/./x"),
            ["t", "other", "x"]
        );
        assert_eq!(path_segments("/../../a"), ["a"]);
        assert_eq!(path_segments("/t/ac%6De"), ["t", "ac%6De"]);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn typed_claims_look_the_same_fresh_or_cached() {
        let fresh = Claims::from_object(
            json!({"iss": "i", "sub": "s", "aud": "api", "exp": 5, "tenant": "t"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap();
        let issuer: Arc<str> = Arc::from("i");
        let rule = Rule::compile(
            "claims.sub == 's' && claims.aud == ['api'] && claims.exp == 5 \
             && claims.tenant == 't' && !has(claims.jti)",
        )
        .unwrap();
        let cached = rule.claims.compact(&fresh, &issuer);
        let request = RequestFacts::default();
        for claims in [&fresh, &cached] {
            assert_eq!(evaluate(&rule, claims, &request, 0), Ok(Value::Bool(true)));
        }
        let whole = Rule::compile("claims.aud == ['api'] && 'tenant' in claims").unwrap();
        assert_eq!(evaluate(&whole, &fresh, &request, 0), Ok(Value::Bool(true)));
    }

    #[test]
    fn matches_keeps_compiled_patterns_and_refuses_huge_ones() {
        let rule = |source: &str| Rule::compile(source).unwrap();
        let request = RequestFacts::default();
        let claims = Claims::default();
        let run = |source: &str| evaluate(&rule(source), &claims, &request, 0);
        assert_eq!(
            run("'ann@example.com'.matches('@example\\\\.com$')"),
            Ok(Value::Bool(true))
        );
        assert_eq!(run("matches('abc', '^b')"), Ok(Value::Bool(false)));
        assert!(run("'a'.matches('(')").is_err());
        assert!(
            run("'a'.matches('a{1000}{1000}')").is_err(),
            "over the size limit"
        );
        assert!(REGEXES.contains_key("@example\\.com$"));
    }

    #[test]
    fn rules_too_big_too_deep_or_looping_too_deep_are_refused_with_a_reason() {
        let refused = |source: String, why: &str| {
            let error = Rule::compile(&source).unwrap_err();
            assert!(error.contains(why), "{error}");
        };
        refused(
            format!("'{}' != ''", "a".repeat(MAX_RULE_BYTES)),
            "bytes long",
        );
        refused(
            format!("{}true{}", "(".repeat(33), ")".repeat(33)),
            "nest 33 deep",
        );
        refused(format!("1{} > 0", " + 1".repeat(300)), "operators");
        refused(format!("1{} > 0", " + 1".repeat(60)), "levels deep");
        let loops = "[1].all(a, [1].all(b, [1].all(c, true)))";
        refused(loops.to_owned(), "nest over 2 deep");
        // Within the limits, and evaluated on a thread with a Check worker's 2 MiB stack.
        let deep = format!("{}true{}", "(".repeat(32), ")".repeat(32));
        let sum = format!("1{} > 0", " + 1".repeat(40));
        for source in [deep, sum, "[1].all(a, [1].all(b, true))".to_owned()] {
            let rule = Rule::compile(&source).unwrap();
            let result = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    evaluate(&rule, &Claims::default(), &RequestFacts::default(), 0).map(|_| ())
                })
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(result, Ok(()), "{source}");
        }
        // Quotes hide brackets and operators from the text checks.
        assert!(Rule::compile(&format!("'{}' != ''", "((+".repeat(200))).is_ok());
    }

    #[test]
    fn rules_see_requests_of_at_most_256_segments_headers_or_parameters() {
        let rule =
            Rule::compile("request.path_segments.all(a, request.path_segments.all(b, true))")
                .unwrap();
        let claims = Claims::default();
        let run = |path: &str| {
            let facts = RequestFacts {
                path,
                ..RequestFacts::default()
            };
            evaluate(&rule, &claims, &facts, 0)
        };
        assert_eq!(run(&"/a".repeat(MAX_REQUEST_ITEMS)), Ok(Value::Bool(true)));
        let error = run(&"/a".repeat(MAX_REQUEST_ITEMS + 1)).unwrap_err();
        assert!(error.to_string().contains("257 path segments"), "{error}");
        let query = Rule::compile("size(request.query) > 0").unwrap();
        let many = format!("/x?{}", "a=1&".repeat(300));
        let facts = RequestFacts {
            path: &many,
            ..RequestFacts::default()
        };
        assert!(evaluate(&query, &claims, &facts, 0).is_err());
        // A rule that does not read the big field is not affected.
        let method = Rule::compile("request.method == ''").unwrap();
        assert_eq!(evaluate(&method, &claims, &facts, 0), Ok(Value::Bool(true)));
    }

    #[test]
    fn a_rule_can_compare_the_client_certificate_hash() {
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = rcgen::CertificateParams::new(vec!["c.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let encoded = pem
            .replace('\n', "%0A")
            .replace('+', "%2B")
            .replace('/', "%2F");
        let hash = crate::binding::certificate_thumbprint(&encoded).unwrap();
        let rule = Rule::compile(&format!("source.certificate_sha256 == '{hash}'")).unwrap();
        let with = RequestFacts {
            source_certificate: &encoded,
            ..RequestFacts::default()
        };
        let claims = Claims::default();
        assert_eq!(evaluate(&rule, &claims, &with, 0), Ok(Value::Bool(true)));
        let without = RequestFacts::default();
        assert_eq!(
            evaluate(&rule, &claims, &without, 0),
            Ok(Value::Bool(false))
        );
    }

    #[test]
    fn inline_rules_may_read_only_the_listed_claims() {
        let allowed: HashSet<String> = ["tenant".to_string()].into();
        let rule = |s: &str| Rule::compile(s).unwrap().reads_only(&allowed);
        assert!(rule("claims.tenant == claims.sub").is_ok());
        assert!(
            rule("claims.email == 'x'")
                .unwrap_err()
                .contains("\"email\"")
        );
        assert!(rule("'x' in claims").is_err());
    }

    #[test]
    fn config_rules_compile_at_load_and_the_default_must_exist() {
        let ok = PolicyConfig::build(
            [("t".to_string(), "claims.tenant == 'a'".to_string())],
            Some("t".into()),
            InlinePolicies::Off,
        )
        .unwrap();
        assert_eq!(ok.claims_read(), named(&["tenant"]));
        let problems = PolicyConfig::build(
            [
                ("bad".to_string(), "claims.tenant ==".to_string()),
                ("none".to_string(), "true".to_string()),
            ],
            Some("missing".into()),
            InlinePolicies::Off,
        )
        .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            InlinePolicies::parse("*").unwrap(),
            InlinePolicies::AnyClaim
        );
        assert_eq!(InlinePolicies::parse(" ").unwrap(), InlinePolicies::Off);
    }
}
