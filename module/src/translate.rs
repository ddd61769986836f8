//! Between Envoy's stream and the sidecar's Check messages, with no FFI: the request Envoy
//! would have sent to ext_authz, built from what the filter reads off the stream, and the
//! Check's answer turned into what the filter does to the stream. The same messages as the
//! gRPC path, so both modes decide and answer alike by construction.

use std::collections::HashMap;

use authz_sidecar::pb::envoy::config::core::v3::{
    Address, SocketAddress, address, header_value_option::HeaderAppendAction,
    socket_address::PortSpecifier,
};
use authz_sidecar::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use authz_sidecar::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, check_response::HttpResponse,
};

/// What the filter read off the request, owned (Envoy's views last only for the hook).
#[derive(Debug, Default)]
pub struct StreamFacts {
    /// Request headers as Envoy holds them (lower-case names, pseudo-headers included).
    pub headers: Vec<(String, String)>,
    /// The downstream peer, `ip:port`.
    pub source: Option<String>,
    /// The route's `context_extensions` (the per-route filter config).
    pub extensions: HashMap<String, String>,
    /// `http` or `https` when the headers carry no `:scheme`.
    pub scheme: String,
}

/// The CheckRequest Envoy's ext_authz filter would send for this stream: repeated headers
/// joined with `,` as Envoy does, `:method`, `:path` and `:authority` also as fields.
pub fn check_request(facts: StreamFacts) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::with_capacity(facts.headers.len());
    for (name, value) in facts.headers {
        match headers.get_mut(&name) {
            Some(joined) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => {
                headers.insert(name, value);
            }
        }
    }
    let field = |name: &str| headers.get(name).cloned().unwrap_or_default();
    let (method, path, host) = (field(":method"), field(":path"), field(":authority"));
    let scheme = headers.get(":scheme").cloned().unwrap_or(facts.scheme);
    let id = field("x-request-id");
    let query = path
        .split_once('?')
        .map_or_else(String::new, |(_, q)| q.to_owned());
    let http = HttpRequest {
        id,
        method,
        path,
        host,
        scheme,
        query,
        headers,
        ..HttpRequest::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: facts.source.as_deref().map(peer),
            request: Some(Request {
                time: None,
                http: Some(http),
            }),
            context_extensions: facts.extensions,
            ..AttributeContext::default()
        }),
    }
}

/// `ip:port` (or `[v6]:port`) as the Peer ext_authz reports: split, not parsed and printed
/// again.
fn peer(source: &str) -> Peer {
    let (ip, port) = match source.rsplit_once(':') {
        Some((ip, port)) => (
            ip.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port.parse().unwrap_or(0),
        ),
        None => (source.to_owned(), 0),
    };
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip,
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..SocketAddress::default()
            })),
        }),
        ..Peer::default()
    }
}

/// A header to write, and whether it replaces the value the request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderWrite {
    pub name: String,
    pub value: String,
    pub replace: bool,
}

/// What the filter does with the stream, from the Check's answer.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Let the request through with these changes.
    Pass(Pass),
    /// Answer the client in Envoy's name.
    Reply {
        status: u32,
        headers: Vec<(String, String)>,
        body: String,
    },
}

/// The changes an allow makes to the stream.
#[derive(Debug, Default, PartialEq)]
pub struct Pass {
    pub request_headers: Vec<HeaderWrite>,
    pub remove: Vec<String>,
    /// Added to the upstream's response (the RateLimit fields).
    pub response_headers: Vec<HeaderWrite>,
    pub metadata: Metadata,
}

/// The claims for the dynamic metadata, split by the setter each kind takes: the strings in
/// one batch call, a call per number or boolean, and anything else (lists, objects, null)
/// merged as one serialized Struct.
#[derive(Debug, Default, PartialEq)]
pub struct Metadata {
    pub strings: Vec<(String, String)>,
    pub numbers: Vec<(String, f64)>,
    pub bools: Vec<(String, bool)>,
    pub rest: Option<Vec<u8>>,
}

impl Metadata {
    fn split(metadata: Option<prost_types::Struct>) -> Metadata {
        use prost_types::value::Kind;
        let mut split = Metadata::default();
        let mut rest = prost_types::Struct::default();
        for (key, value) in metadata.map(|m| m.fields).unwrap_or_default() {
            match value.kind {
                Some(Kind::StringValue(text)) => split.strings.push((key, text)),
                Some(Kind::NumberValue(n)) => split.numbers.push((key, n)),
                Some(Kind::BoolValue(b)) => split.bools.push((key, b)),
                kind => {
                    rest.fields.insert(key, prost_types::Value { kind });
                }
            }
        }
        split.rest = (!rest.fields.is_empty()).then(|| prost::Message::encode_to_vec(&rest));
        split
    }
}

/// The answer as Envoy's ext_authz filter applies a CheckResponse: an OK status with its header
/// changes, or a local reply with the denied response's status (403 when it names none),
/// headers and body. The sidecar answers every failure as a denied response, never an RPC
/// error, so nothing here passes a request on error.
pub fn answer(response: CheckResponse) -> Answer {
    let ok = response.status.as_ref().is_none_or(|s| s.code == 0);
    match (ok, response.http_response) {
        (true, Some(HttpResponse::OkResponse(ok))) => Answer::Pass(Pass {
            request_headers: ok.headers.into_iter().filter_map(write).collect(),
            remove: ok.headers_to_remove,
            response_headers: ok
                .response_headers_to_add
                .into_iter()
                .filter_map(write)
                .collect(),
            metadata: Metadata::split(response.dynamic_metadata),
        }),
        (true, _) => Answer::Pass(Pass {
            metadata: Metadata::split(response.dynamic_metadata),
            ..Pass::default()
        }),
        (false, Some(HttpResponse::DeniedResponse(denied))) => Answer::Reply {
            status: denied
                .status
                .map(|s| s.code as u32)
                .filter(|code| (200..600).contains(code))
                .unwrap_or(403),
            headers: denied
                .headers
                .into_iter()
                .filter_map(write)
                .map(|h| (h.name, h.value))
                .collect(),
            body: denied.body,
        },
        (false, _) => Answer::Reply {
            status: 403,
            headers: Vec::new(),
            body: String::new(),
        },
    }
}

/// A HeaderValueOption as ext_authz applies it: `append_action` decides, and the deprecated
/// `append: false` (which the sidecar also sets) means replace.
fn write(
    option: authz_sidecar::pb::envoy::config::core::v3::HeaderValueOption,
) -> Option<HeaderWrite> {
    let header = option.header?;
    let replace = match option.append {
        Some(append) => !append,
        None => option.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
    };
    Some(HeaderWrite {
        name: header.key,
        value: header.value,
        replace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(headers: &[(&str, &str)]) -> StreamFacts {
        StreamFacts {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source: Some("10.1.2.3:5555".into()),
            ..StreamFacts::default()
        }
    }

    #[test]
    fn repeated_headers_are_joined_and_pseudo_headers_become_fields() {
        let request = check_request(facts(&[
            (":method", "GET"),
            (":path", "/orders?id=1"),
            (":authority", "api.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]));
        let attributes = request.attributes.unwrap();
        let http = attributes.request.unwrap().http.unwrap();
        assert_eq!(http.method, "GET");
        assert_eq!(http.path, "/orders?id=1");
        assert_eq!(http.query, "id=1");
        assert_eq!(http.host, "api.example");
        assert_eq!(http.headers["x-forwarded-for"], "1.1.1.1,2.2.2.2");
        let peer = attributes.source.unwrap().address.unwrap().address.unwrap();
        let address::Address::SocketAddress(socket) = peer else {
            panic!("not a socket address")
        };
        assert_eq!(socket.address, "10.1.2.3");
        assert_eq!(socket.port_specifier, Some(PortSpecifier::PortValue(5555)));
    }

    #[test]
    fn every_sidecar_answer_maps_to_what_ext_authz_would_do() {
        use authz_sidecar::check::response::failure;
        use authz_sidecar::decision::CheckError;
        // A failure is a reply with the failure's own status, never a pass.
        match answer(failure(CheckError::RevocationUnavailable)) {
            Answer::Reply {
                status, headers, ..
            } => {
                assert_eq!(status, 503);
                assert!(headers.iter().any(|(k, _)| k == "content-type"));
            }
            pass => panic!("a failure passed: {pass:?}"),
        }
        // An RPC error status without a denied response: ext_authz's default 403.
        let refused = CheckResponse {
            status: Some(authz_sidecar::pb::google::rpc::Status {
                code: 7,
                ..Default::default()
            }),
            ..CheckResponse::default()
        };
        assert!(matches!(answer(refused), Answer::Reply { status: 403, .. }));
    }

    #[test]
    fn metadata_is_split_by_the_setter_each_kind_takes() {
        use prost_types::value::Kind;
        let value = |kind| prost_types::Value { kind: Some(kind) };
        let fields = [
            ("sub", value(Kind::StringValue("alice".into()))),
            ("exp", value(Kind::NumberValue(7.0))),
            ("admin", value(Kind::BoolValue(true))),
            (
                "roles",
                value(Kind::ListValue(prost_types::ListValue::default())),
            ),
        ];
        let response = CheckResponse {
            dynamic_metadata: Some(prost_types::Struct {
                fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            }),
            ..CheckResponse::default()
        };
        let Answer::Pass(pass) = answer(response) else {
            panic!("an OK answer did not pass")
        };
        let metadata = pass.metadata;
        assert_eq!(metadata.strings, [("sub".to_owned(), "alice".to_owned())]);
        assert_eq!(metadata.numbers, [("exp".to_owned(), 7.0)]);
        assert_eq!(metadata.bools, [("admin".to_owned(), true)]);
        let rest: prost_types::Struct =
            prost::Message::decode(metadata.rest.expect("the list is kept").as_slice()).unwrap();
        assert_eq!(rest.fields.keys().collect::<Vec<_>>(), ["roles"]);
    }
}
