//! What a Check reads from Envoy's request: the token (header or cookie) and its scheme, the
//! DPoP proof and the request it must be for, the caller's deadline (`grpc-timeout`) and the
//! client's address (for rate limits).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::binding::Scheme;
use crate::dpop::ProofTarget;
use crate::pb::envoy::config::core::v3::address;
use crate::pb::envoy::service::auth::v3::AttributeContext;
use crate::policy::RequestFacts;

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    /// Lower-case header name (Envoy lower-cases the keys it sends).
    pub header: String,
    /// Cookie consulted when the header carries no token.
    pub cookie: Option<String>,
}

impl TokenSource {
    /// `TOKEN_COOKIE`: a cookie name, or empty for none.
    pub fn parse_cookie(value: &str) -> Result<Option<String>, String> {
        if value.contains([';', '=', ',', ' ']) {
            return Err(format!("{value:?} is not a cookie name"));
        }
        Ok((!value.is_empty()).then(|| value.to_owned()))
    }
}

/// The token from the configured header, else from the configured cookie, with its scheme.
/// On the `authorization` header only the Bearer and DPoP schemes (any case) count; a custom
/// header may carry the bare token or a Bearer or DPoP value; a cookie is a bearer token.
pub fn extract_token<'h>(
    headers: &'h HashMap<String, String>,
    source: &TokenSource,
) -> Option<(&'h str, Scheme)> {
    let from_header = headers
        .get(&source.header)
        .and_then(|value| token_in_header(value, source));
    let from_cookie = || {
        let name = source.cookie.as_deref()?;
        headers.get("cookie")?.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| (value.trim_matches('"'), Scheme::Bearer))
        })
    };
    from_header
        .or_else(from_cookie)
        .filter(|(t, _)| !t.is_empty())
}

/// The token in one value of the configured header, with its scheme (the rules above).
pub fn token_in_header<'v>(value: &'v str, source: &TokenSource) -> Option<(&'v str, Scheme)> {
    let value = value.trim();
    match strip_scheme(value) {
        Some(found) => Some(found),
        None if source.header == "authorization" => None,
        None => Some((value, Scheme::Bearer)),
    }
}

fn strip_scheme(value: &str) -> Option<(&str, Scheme)> {
    let (scheme, rest) = value.split_once(' ')?;
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return None;
    };
    Some((rest.trim_start(), scheme))
}

/// The `DPoP` header as Envoy sent it (repeats joined with `,`), if any.
pub fn dpop_proof(headers: Option<&HashMap<String, String>>) -> Option<&str> {
    headers?.get("dpop").map(String::as_str)
}

/// The request a DPoP proof must be for: method, `:authority` and `:path` as Envoy received
/// them; the scheme of Envoy's downstream connection, or with `trust_forwarded_proto` the
/// first `x-forwarded-proto` entry (what a TLS terminator in front of Envoy says the client
/// used) when there is one.
pub fn proof_target(
    attributes: Option<&AttributeContext>,
    trust_forwarded_proto: bool,
) -> ProofTarget<'_> {
    let Some(http) = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
    else {
        return ProofTarget::default();
    };
    let forwarded = trust_forwarded_proto
        .then(|| http.headers.get("x-forwarded-proto"))
        .flatten()
        .and_then(|value| value.split(',').next())
        .map(str::trim)
        .filter(|proto| !proto.is_empty());
    ProofTarget {
        method: &http.method,
        scheme: forwarded.unwrap_or(&http.scheme),
        authority: &http.host,
        path: &http.path,
    }
}

/// The time left to answer: the caller's `grpc-timeout` (Envoy sends its ext_authz timeout)
/// less a tenth, kept for the answer's trip back. `None` without the header.
pub fn deadline_budget(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    Some(timeout - timeout / 10)
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits, then H, M, S, m, u or n.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// What a CEL rule sees of the request: method, path, host and headers as Envoy sent them, and
/// the downstream peer (address, TLS principal, the certificate when Envoy includes it).
pub fn request_facts(attributes: Option<&AttributeContext>) -> RequestFacts<'_> {
    let Some(attributes) = attributes else {
        return RequestFacts::default();
    };
    let http = attributes.request.as_ref().and_then(|r| r.http.as_ref());
    let peer = attributes.source.as_ref();
    let socket = match peer.and_then(|p| p.address.as_ref()?.address.as_ref()) {
        Some(address::Address::SocketAddress(socket)) => Some(socket),
        _ => None,
    };
    RequestFacts {
        method: http.map_or("", |h| h.method.as_str()),
        path: http.map_or("", |h| h.path.as_str()),
        host: http.map_or("", |h| h.host.as_str()),
        headers: http.map(|h| &h.headers),
        source_address: socket.map(|s| s.address.as_str()),
        source_port: socket.and_then(|s| match s.port_specifier {
            Some(crate::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                port,
            )) => Some(port),
            _ => None,
        }),
        source_principal: peer.map_or("", |p| p.principal.as_str()),
        source_certificate: peer.map_or("", |p| p.certificate.as_str()),
    }
}

/// The client's address for limits: with `trusted_hops` 0 Envoy's downstream peer, else the
/// `trusted_hops`-th `x-forwarded-for` entry from the right (each trusted proxy appends the
/// address it was called from), with or without a port. Falls back to the peer when the header
/// is shorter or the entry is not an address. IPv6 addresses are cut to their /64.
pub fn client_ip(attributes: Option<&AttributeContext>, trusted_hops: usize) -> Option<IpAddr> {
    let attributes = attributes?;
    let forwarded = (trusted_hops > 0)
        .then(|| {
            let http = attributes.request.as_ref()?.http.as_ref()?;
            let header = http.headers.get("x-forwarded-for")?;
            forwarded_address(header.rsplit(',').nth(trusted_hops - 1)?)
        })
        .flatten();
    let peer = || match attributes
        .source
        .as_ref()?
        .address
        .as_ref()?
        .address
        .as_ref()?
    {
        address::Address::SocketAddress(socket) => socket.address.parse().ok(),
        _ => None,
    };
    forwarded.or_else(peer).map(|ip| match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked above")),
        v4 => v4,
    })
}

/// One `x-forwarded-for` entry's address: `1.2.3.4`, `2001:db8::1`, and as some proxies write
/// them, with a port (`1.2.3.4:555`, `[2001:db8::1]:443`) or in brackets (`[2001:db8::1]`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::envoy::config::core::v3::{Address, SocketAddress};
    use crate::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn token_extraction() {
        let bearer = TokenSource {
            header: "authorization".into(),
            cookie: Some("session".into()),
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
        fn token<'h>(h: &'h HashMap<String, String>, s: &TokenSource) -> Option<&'h str> {
            extract_token(h, s).map(|(token, _)| token)
        }
        let cases: &[Case] = &[
            (&[("authorization", "Bearer abc")], Some("abc")),
            (&[("authorization", "DPoP abc")], Some("abc")),
            (&[("authorization", "bearer  abc ")], Some("abc")),
            (&[("authorization", "BEARER abc")], Some("abc")),
            (&[("authorization", "Basic abc")], None),
            (&[("authorization", "abc")], None),
            (&[("authorization", "Bearer ")], None),
            (&[("cookie", "a=1; session=tok; b=2")], Some("tok")),
            (&[("cookie", "sessionx=no")], None),
            (
                &[("authorization", "Basic x"), ("cookie", "session=tok")],
                Some("tok"),
            ),
            (
                &[("authorization", "Bearer h"), ("cookie", "session=c")],
                Some("h"),
            ),
            (&[], None),
        ];
        for (pairs, expected) in cases {
            assert_eq!(token(&headers(pairs), &bearer), *expected, "{pairs:?}");
        }
        let scheme = |value: &str| {
            extract_token(&headers(&[("authorization", value)]), &bearer).map(|(_, s)| s)
        };
        assert_eq!(scheme("Bearer a"), Some(Scheme::Bearer));
        assert_eq!(scheme("dpop a"), Some(Scheme::Dpop));
        assert_eq!(scheme("DPoP  a"), Some(Scheme::Dpop));
        assert_eq!(scheme("DPoPx a"), None);
        let cookie = headers(&[("cookie", "session=t")]);
        assert_eq!(extract_token(&cookie, &bearer), Some(("t", Scheme::Bearer)));
        let custom = TokenSource {
            header: "x-access-token".into(),
            cookie: None,
        };
        assert_eq!(
            token(&headers(&[("x-access-token", "raw")]), &custom),
            Some("raw")
        );
        assert_eq!(
            token(&headers(&[("x-access-token", "Bearer t")]), &custom),
            Some("t")
        );
        assert_eq!(token(&headers(&[("cookie", "session=tok")]), &custom), None);
    }

    #[test]
    fn grpc_timeouts_parse_by_the_spec() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "١S", "1١"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    fn attributes(peer: &str, xff: Option<&str>) -> AttributeContext {
        let mut headers = std::collections::HashMap::new();
        if let Some(xff) = xff {
            headers.insert("x-forwarded-for".to_owned(), xff.to_owned());
        }
        AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.into(),
                        ..SocketAddress::default()
                    })),
                }),
                ..Peer::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    headers,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }
    }

    #[test]
    fn client_ip_trusts_only_the_configured_hops() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let spoofed = attributes("10.0.0.9", Some("6.6.6.6, 203.0.113.7, 10.0.0.2"));
        assert_eq!(client_ip(Some(&spoofed), 0), ip("10.0.0.9"));
        assert_eq!(client_ip(Some(&spoofed), 1), ip("10.0.0.2"));
        assert_eq!(client_ip(Some(&spoofed), 2), ip("203.0.113.7"));
        assert_eq!(
            client_ip(Some(&spoofed), 5),
            ip("10.0.0.9"),
            "a short header falls back to the peer"
        );
        let garbage = attributes("10.0.0.9", Some("not-an-ip"));
        assert_eq!(client_ip(Some(&garbage), 1), ip("10.0.0.9"));
        // Proxies that append the client's port, or bracket an IPv6 address.
        for (entry, expected) in [
            ("1.2.3.4:555", "1.2.3.4"),
            ("[2001:db8::1]:443", "2001:db8::"),
            ("[2001:db8::1]", "2001:db8::"),
            ("2001:db8::1", "2001:db8::"),
            (" 1.2.3.4 ", "1.2.3.4"),
            ("[::ffff:192.0.2.7]:80", "192.0.2.7"),
        ] {
            let behind = attributes("10.0.0.9", Some(&format!("6.6.6.6, {entry}")));
            assert_eq!(client_ip(Some(&behind), 1), ip(expected), "{entry}");
        }
        for junk in ["1.2.3.4:", "[2001:db8::1", "1.2.3.4:99999", "[1.2.3.4]x"] {
            let behind = attributes("10.0.0.9", Some(junk));
            assert_eq!(client_ip(Some(&behind), 1), ip("10.0.0.9"), "{junk}");
        }
        let v6 = attributes("2001:db8:1:2:aaaa:bbbb:cccc:dddd", None);
        assert_eq!(client_ip(Some(&v6), 0), ip("2001:db8:1:2::"));
        let mapped = attributes("::ffff:192.0.2.1", None);
        assert_eq!(client_ip(Some(&mapped), 0), ip("192.0.2.1"));
        assert_eq!(client_ip(None, 0), None);
        assert_eq!(client_ip(Some(&AttributeContext::default()), 0), None);
    }
}
