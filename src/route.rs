//! Per-route requirements, from the `context_extensions` Envoy sends with each Check (set per
//! route or virtual host under `typed_per_filter_config` → `check_settings`):
//!
//! | key | value | effect |
//! |---|---|---|
//! | `required_scopes` | space-separated scopes | every one must be among the token's scopes |
//! | `audiences` | comma-separated | replaces the issuer's accepted audiences on this route |
//! | `allow_anonymous` | `true` / `false` | no token is fine here; a bad token is still denied |
//! | `rate_limit` | comma-separated policy names, or `none` | replaces the default rate-limit policies |
//! | `policy` | a CEL expression | must be `true` for the request to pass (src/policy.rs) |
//! | `policy_ref` | a CONFIG_FILE `policies` name, or `none` | the named rule instead of the default |
//! | `acr_values` | space-separated | the token's `acr` must be one of them (RFC 9470 step-up) |
//! | `max_age` | seconds | the token's `auth_time` must be at most this old (RFC 9470) |
//! | `dry_run` | `true` / `false` | scopes, step-up and the rule are recorded, not enforced |
//! | `route_id` | a name | names the route in the decision log (src/audit.rs) |
//! | `require_sender_constraint` | `true` / `false` | unbound tokens are refused (src/binding.rs) |
//!
//! A bad value, or a key this sidecar does not know, fails the Check with `bad_route_config`
//! (HTTP 500): a typo in a route (`required_scope`) must not silently remove its requirement.
//! Keys meant for something else (access-log tags, other filters) pass only when listed in
//! `CONTEXT_EXTENSIONS_IGNORED`.

use std::collections::HashMap;

use crate::claims::{Claims, KeptClaims, ReadsClaims, SCOPE_CLAIMS};

/// The keys this module reads; any other key must be listed as ignored.
pub const KNOWN_KEYS: [&str; 11] = [
    "required_scopes",
    "audiences",
    "allow_anonymous",
    "rate_limit",
    "policy",
    "policy_ref",
    "acr_values",
    "max_age",
    "dry_run",
    "route_id",
    "require_sender_constraint",
];

/// `CONTEXT_EXTENSIONS_IGNORED`: comma-separated keys meant for others. A key this module reads
/// cannot be ignored.
pub fn parse_ignored_keys(value: &str) -> Result<Vec<String>, String> {
    let keys = crate::config::parse::split_list(value);
    if let Some(known) = keys.iter().find(|key| KNOWN_KEYS.contains(&key.as_str())) {
        return Err(format!(
            "{known:?} is a key this sidecar reads; it cannot be ignored"
        ));
    }
    Ok(keys)
}

/// What a route asks beyond the global rules. Borrows from the request: no allocation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteRequirements<'a> {
    pub required_scopes: Vec<&'a str>,
    pub audiences: Option<Vec<&'a str>>,
    pub allow_anonymous: bool,
    /// Rate-limit policy names; `None`: the configured defaults.
    pub rate_limit: Option<Vec<&'a str>>,
    /// Which CEL rule must pass.
    pub policy: RoutePolicy<'a>,
    /// Step-up (RFC 9470): accepted `acr` values; empty: any.
    pub acr_values: Vec<&'a str>,
    /// Step-up (RFC 9470): the oldest `auth_time` accepted, in seconds before now.
    pub max_age: Option<i64>,
    /// Scopes, step-up and the CEL rule are evaluated and recorded but do not deny; `None`:
    /// the global `POLICY_DRY_RUN` (the Check service fills it in before deciding).
    pub dry_run: Option<bool>,
    /// The route's name in the decision log.
    pub route_id: Option<&'a str>,
    /// Unbound tokens are refused here; `None`: `REQUIRE_SENDER_CONSTRAINT`.
    pub require_sender_constraint: Option<bool>,
}

/// The CEL rule a route asks for (src/policy.rs runs it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum RoutePolicy<'a> {
    /// No `policy` or `policy_ref`: CONFIG_FILE's `default_policy`, if any.
    #[default]
    Default,
    /// `policy_ref: none`: no rule here, not even the default.
    None,
    /// `policy_ref: <name>`.
    Named(&'a str),
    /// `policy: <expression>`.
    Inline(&'a str),
}

impl<'a> RouteRequirements<'a> {
    /// Reads the requirements; `Err` names the bad key, for the log. `ignored`: the keys meant
    /// for others (`CONTEXT_EXTENSIONS_IGNORED`).
    pub fn from_extensions(
        extensions: &'a HashMap<String, String>,
        ignored: &[String],
    ) -> Result<Self, String> {
        let mut route = RouteRequirements::default();
        for (key, value) in extensions {
            match key.as_str() {
                "required_scopes" => {
                    route.required_scopes = value.split_whitespace().collect();
                    if route.required_scopes.is_empty() {
                        return Err("required_scopes is empty".into());
                    }
                }
                "audiences" => {
                    let audiences: Vec<&str> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|a| !a.is_empty())
                        .collect();
                    if audiences.is_empty() {
                        return Err("audiences is empty".into());
                    }
                    route.audiences = Some(audiences);
                }
                "allow_anonymous" => route.allow_anonymous = flag(key, value)?,
                "dry_run" => route.dry_run = Some(flag(key, value)?),
                "require_sender_constraint" => {
                    route.require_sender_constraint = Some(flag(key, value)?)
                }
                "route_id" => {
                    let id = value.trim();
                    if id.is_empty() || id.len() > 128 || id.contains(char::is_control) {
                        return Err(format!(
                            "route_id must be 1-128 printable characters, not {value:?}"
                        ));
                    }
                    route.route_id = Some(id);
                }
                "rate_limit" => {
                    let names: Vec<&str> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .collect();
                    if names.is_empty() || (names.len() > 1 && names.contains(&"none")) {
                        return Err(format!(
                            "rate_limit must name policies or be `none`, not {value:?}"
                        ));
                    }
                    route.rate_limit = Some(names);
                }
                "policy" | "policy_ref" => {
                    let value = value.trim();
                    if value.is_empty() {
                        return Err(format!("{key} is empty"));
                    }
                    if route.policy != RoutePolicy::Default {
                        return Err("set `policy` or `policy_ref`, not both".into());
                    }
                    route.policy = match (key.as_str(), value) {
                        ("policy", expression) => RoutePolicy::Inline(expression),
                        (_, "none") => RoutePolicy::None,
                        (_, name) => RoutePolicy::Named(name),
                    };
                }
                "acr_values" => {
                    route.acr_values = value.split_whitespace().collect();
                    // They are echoed in a quoted WWW-Authenticate parameter.
                    if route.acr_values.is_empty()
                        || value.contains(|c: char| c == '"' || c == '\\' || c.is_control())
                    {
                        return Err(format!(
                            "acr_values must be space-separated values without quotes, not \
                             {value:?}"
                        ));
                    }
                }
                "max_age" => {
                    route.max_age = Some(
                        value
                            .trim()
                            .parse::<u32>()
                            .map_err(|_| format!("max_age must be whole seconds, not {value:?}"))?
                            .into(),
                    );
                }
                other if ignored.iter().any(|name| name == other) => {}
                other => {
                    return Err(format!(
                        "unknown key {other:?} (known: {}; list keys meant for others in \
                         CONTEXT_EXTENSIONS_IGNORED)",
                        KNOWN_KEYS.join(", ")
                    ));
                }
            }
        }
        Ok(route)
    }

    /// Whether scopes, step-up and the rule only record what they would decide on this route.
    pub fn dry_run(&self) -> bool {
        self.dry_run == Some(true)
    }

    /// Whether the token's authentication is what the route asks (RFC 9470): its `acr` among
    /// `acr_values`, its `auth_time` within `max_age` of `now` (unix seconds). A token without
    /// the claim a requirement reads does not satisfy it.
    pub fn authentication_satisfied(&self, claims: &Claims, now: i64) -> bool {
        let acr = || claims.value("acr");
        let acr_ok = self.acr_values.is_empty()
            || acr().is_some_and(|acr| {
                acr.as_str()
                    .is_some_and(|acr| self.acr_values.contains(&acr))
            });
        let age_ok = self.max_age.is_none_or(|max_age| {
            auth_time(claims).is_some_and(|auth_time| now.saturating_sub(auth_time) <= max_age)
        });
        acr_ok && age_ok
    }

    /// The last unix second at which [`RouteRequirements::authentication_satisfied`]'s clock
    /// rule (`max_age` since `auth_time`) holds for the claims, `None` if it never does; its
    /// `acr` rule reads no clock.
    pub fn authentication_holds_until(&self, claims: &Claims) -> Option<i64> {
        match self.max_age {
            None => Some(i64::MAX),
            Some(max_age) => auth_time(claims).map(|auth_time| auth_time.saturating_add(max_age)),
        }
    }

    /// Whether the token carries every required scope ([`Claims::scopes`]).
    pub fn scopes_satisfied(&self, claims: &Claims) -> bool {
        self.required_scopes
            .iter()
            .all(|needed| claims.scopes().any(|granted| granted == *needed))
    }
}

/// `auth_time` in whole seconds (a fraction is dropped).
fn auth_time(claims: &Claims) -> Option<i64> {
    claims
        .value("auth_time")
        .and_then(|t| t.as_i64().or_else(|| t.as_f64().map(|f| f as i64)))
}

/// `true` or `false`, any case.
fn flag(key: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{key} must be true or false, not {value:?}")),
    }
}

/// The per-route rules as a claim reader: any route may require scopes, an `acr` or a recent
/// `auth_time`.
pub struct RouteRules;

/// The claims step-up requirements read.
const STEP_UP_CLAIMS: [&str; 2] = ["acr", "auth_time"];

impl ReadsClaims for RouteRules {
    fn claims_read(&self) -> KeptClaims {
        KeptClaims::Named(
            SCOPE_CLAIMS
                .iter()
                .chain(&STEP_UP_CLAIMS)
                .map(|name| name.to_string())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn extensions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_known_keys_and_ignores_only_the_listed_others() {
        let map = extensions(&[
            ("required_scopes", " orders:read  orders:write "),
            ("audiences", "partner-api, batch"),
            ("allow_anonymous", "TRUE"),
            ("rate_limit", "orders, per-ip"),
            ("dry_run", "True"),
            ("route_id", " orders-read "),
            ("team", "payments"),
        ]);
        let error = RouteRequirements::from_extensions(&map, &[]).unwrap_err();
        assert!(error.contains("\"team\""), "{error}");
        let route = RouteRequirements::from_extensions(&map, &["team".into()]).unwrap();
        assert_eq!(route.required_scopes, vec!["orders:read", "orders:write"]);
        assert_eq!(route.audiences, Some(vec!["partner-api", "batch"]));
        assert!(route.allow_anonymous);
        assert_eq!(route.rate_limit, Some(vec!["orders", "per-ip"]));
        assert!(route.dry_run());
        assert_eq!(route.route_id, Some("orders-read"));
        assert_eq!(
            RouteRequirements::from_extensions(&HashMap::new(), &[]).unwrap(),
            RouteRequirements::default()
        );
        // A typo of a requirement is an error, never a route without the requirement.
        let typo = extensions(&[("required_scope", "admin")]);
        assert!(RouteRequirements::from_extensions(&typo, &[]).is_err());
    }

    #[test]
    fn bad_values_are_errors_not_open_routes() {
        for (key, value) in [
            ("allow_anonymous", "yes please"),
            ("required_scopes", "  "),
            ("audiences", ","),
            ("rate_limit", " , "),
            ("rate_limit", "none,orders"),
            ("policy", " "),
            ("policy_ref", ""),
            ("acr_values", " "),
            ("acr_values", "gold \"x"),
            ("max_age", "-1"),
            ("max_age", "5m"),
            ("dry_run", "on"),
            ("route_id", " "),
            ("route_id", "a\nb"),
        ] {
            let map = extensions(&[(key, value)]);
            let error = RouteRequirements::from_extensions(&map, &[]).unwrap_err();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn a_route_names_one_rule_inline_or_by_name() {
        let read = |pairs: &[(&str, &str)]| {
            let map = extensions(pairs);
            RouteRequirements::from_extensions(&map, &[]).map(|r| match r.policy {
                RoutePolicy::Inline(s) => format!("inline {s}"),
                RoutePolicy::Named(s) => format!("named {s}"),
                other => format!("{other:?}"),
            })
        };
        assert_eq!(read(&[]).unwrap(), "Default");
        assert_eq!(read(&[("policy", " a == b ")]).unwrap(), "inline a == b");
        assert_eq!(read(&[("policy_ref", "t")]).unwrap(), "named t");
        assert_eq!(read(&[("policy_ref", "none")]).unwrap(), "None");
        let both = read(&[("policy", "true"), ("policy_ref", "t")]).unwrap_err();
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn step_up_needs_an_accepted_acr_and_a_recent_auth_time() {
        let route = RouteRequirements {
            acr_values: vec!["mfa", "hwk"],
            max_age: Some(300),
            ..Default::default()
        };
        let claims = |all: Value| Claims {
            all: all.as_object().unwrap().clone().into(),
            ..Claims::default()
        };
        let now = 10_000;
        assert!(
            route.authentication_satisfied(&claims(json!({"acr": "mfa", "auth_time": 9_700})), now)
        );
        assert!(
            !route
                .authentication_satisfied(&claims(json!({"acr": "mfa", "auth_time": 9_699})), now)
        );
        assert!(
            !route.authentication_satisfied(&claims(json!({"acr": "pwd", "auth_time": now})), now)
        );
        assert!(!route.authentication_satisfied(&claims(json!({"acr": "mfa"})), now));
        assert!(!route.authentication_satisfied(&claims(json!({"auth_time": now})), now));
        assert!(RouteRequirements::default().authentication_satisfied(&claims(json!({})), now));
        let map = extensions(&[("acr_values", " mfa  hwk "), ("max_age", "300")]);
        let read = RouteRequirements::from_extensions(&map, &[]).unwrap();
        assert_eq!(
            (read.acr_values, read.max_age),
            (vec!["mfa", "hwk"], Some(300))
        );
    }

    /// Under `max_age`, `authentication_satisfied` holds up to `authentication_holds_until`
    /// and never after (its `acr` rule reads no clock).
    #[test]
    fn authentication_holds_exactly_until_its_max_age() {
        let claims = |all: Value| Claims {
            all: all.as_object().unwrap().clone().into(),
            ..Claims::default()
        };
        for max_age in [None, Some(0), Some(300)] {
            let route = RouteRequirements {
                max_age,
                ..Default::default()
            };
            for token in [
                json!({}),
                json!({"auth_time": 1_000}),
                json!({"auth_time": 1_000.9}),
                json!({"auth_time": "1000"}),
            ] {
                let token = claims(token);
                let until = route.authentication_holds_until(&token);
                for now in (900..1_400).chain([i64::MIN, i64::MAX]) {
                    assert_eq!(
                        route.authentication_satisfied(&token, now),
                        until.is_some_and(|until| now <= until),
                        "max_age {max_age:?} claims {:?} now {now} until {until:?}",
                        token.all
                    );
                }
            }
        }
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let route = RouteRequirements {
            required_scopes: vec!["a", "b"],
            ..Default::default()
        };
        let claims = |all: Value| Claims {
            all: all.as_object().unwrap().clone().into(),
            ..Claims::default()
        };
        assert!(route.scopes_satisfied(&claims(json!({"scope": "b c a"}))));
        assert!(route.scopes_satisfied(&claims(json!({"scp": ["a", "b"]}))));
        assert!(route.scopes_satisfied(&claims(json!({"scope": "a", "scp": "b"}))));
        assert!(!route.scopes_satisfied(&claims(json!({"scope": "a"}))));
        assert!(!route.scopes_satisfied(&claims(json!({"scope": "ab"}))));
        assert!(!route.scopes_satisfied(&claims(json!({}))));
        assert!(RouteRequirements::default().scopes_satisfied(&claims(json!({}))));
    }
}
