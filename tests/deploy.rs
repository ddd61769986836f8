//! The deployment examples agree with each other and with the binary. The Envoy example is run
//! for real by tests/e2e.rs; Istio cannot run here, so its files are checked for consistency.

use serde_yaml_ng::Value;

fn read(path: &str) -> Value {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn default_grpc_port() -> u64 {
    use clap::CommandFactory;
    let command = authz_sidecar::cli::Cli::command();
    let arg = command
        .get_arguments()
        .find(|a| a.get_long() == Some("grpc-listen-addr"))
        .unwrap();
    let default = arg.get_default_values()[0].to_string_lossy().into_owned();
    default.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_istio_policy_uses_the_provider_the_mesh_config_declares() {
    let mesh = read("deploy/istio/mesh-config.yaml");
    let providers = mesh["spec"]["meshConfig"]["extensionProviders"]
        .as_sequence()
        .unwrap();
    assert_eq!(providers.len(), 1);
    let provider = &providers[0];
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert_eq!(
        grpc["port"].as_u64(),
        Some(default_grpc_port()),
        "the sidecar's gRPC port"
    );
    assert_eq!(grpc["failOpen"].as_bool(), Some(false));
    assert_eq!(
        grpc["statusOnError"].as_str(),
        Some("503"),
        "statusOnError is a string in MeshConfig"
    );
    assert!(
        grpc["service"]
            .as_str()
            .unwrap()
            .ends_with(".svc.cluster.local")
    );

    let policy = read("deploy/istio/authorization-policy.yaml");
    assert_eq!(policy["apiVersion"].as_str(), Some("security.istio.io/v1"));
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(policy["spec"]["provider"]["name"], provider["name"]);
    let rules = policy["spec"]["rules"].as_sequence().unwrap();
    assert!(
        !rules.is_empty(),
        "Istio rejects a CUSTOM policy without rules"
    );
}

#[test]
fn the_envoy_example_points_at_the_sidecar_port_and_fails_closed() {
    let envoy = read("deploy/envoy/envoy.yaml");
    let clusters = envoy["static_resources"]["clusters"].as_sequence().unwrap();
    let authz = clusters
        .iter()
        .find(|c| c["name"] == "authz_sidecar")
        .unwrap();
    let endpoint = &authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
    assert_eq!(
        endpoint["address"]["socket_address"]["port_value"].as_u64(),
        Some(default_grpc_port())
    );
    let filters = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
    let http_filters = filters["typed_config"]["http_filters"]
        .as_sequence()
        .unwrap();
    let ext_authz = &http_filters[0]["typed_config"];
    assert_eq!(ext_authz["failure_mode_allow"].as_bool(), Some(false));
    assert_eq!(
        ext_authz["status_on_error"]["code"].as_str(),
        Some("ServiceUnavailable")
    );
    assert_eq!(ext_authz["transport_api_version"].as_str(), Some("V3"));
}

#[test]
fn the_mtls_envoy_example_differs_only_by_the_sidecar_clusters_tls() {
    let plain = read("deploy/envoy/envoy.yaml");
    let mut mtls = read("deploy/envoy/envoy-mtls.yaml");
    let clusters = mtls["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    let authz = clusters
        .iter_mut()
        .find(|c| c["name"] == "authz_sidecar")
        .unwrap()
        .as_mapping_mut()
        .unwrap();
    let tls = authz
        .remove("transport_socket")
        .expect("the mTLS example has a transport_socket");
    assert_eq!(
        mtls, plain,
        "apart from the transport_socket, the two examples are equal"
    );
    let context = &tls["typed_config"]["common_tls_context"];
    assert!(
        context["tls_certificates"][0]["certificate_chain"]["filename"]
            .as_str()
            .is_some(),
        "Envoy presents a client certificate"
    );
    assert!(
        context["validation_context"]["trusted_ca"]["filename"]
            .as_str()
            .is_some()
    );
    assert_eq!(context["alpn_protocols"][0].as_str(), Some("h2"));
}

#[test]
fn the_dockerfile_builds_and_runs_the_right_binary_as_non_root() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let find = |keyword: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|l| l.starts_with(keyword))
            .copied()
            .collect()
    };
    let binary = env!("CARGO_PKG_NAME");
    assert_eq!(
        find("FROM").len(),
        2,
        "multi-stage: build, then a small runtime image"
    );
    assert!(
        find("RUN")
            .iter()
            .any(|l| l.contains(&format!("--release --locked --bin {binary}")))
    );
    assert_eq!(
        find("ENTRYPOINT"),
        vec![format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]").as_str()]
    );
    assert!(
        find("COPY --from=build")
            .iter()
            .any(|l| l.contains(&format!("target/release/{binary}")))
    );
    let user = find("USER");
    assert_eq!(user.len(), 1);
    let uid: u32 = user[0]
        .trim_start_matches("USER ")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(uid, 0, "not root");
    let port = default_grpc_port().to_string();
    assert!(
        find("EXPOSE")
            .iter()
            .any(|l| l.split_whitespace().any(|p| p == port)),
        "exposes the gRPC port"
    );
    // Everything the build needs is copied in: the manifest's bench targets and the protos.
    for path in ["Cargo.lock", "build.rs", "proto", "src", "benches"] {
        assert!(
            find("COPY")
                .iter()
                .any(|l| l.split_whitespace().any(|w| w == path)),
            "COPY {path}"
        );
    }
}

#[test]
fn the_client_certificate_example_differs_only_by_downstream_tls_and_the_forwarded_cert() {
    let plain = read("deploy/envoy/envoy.yaml");
    let mut certs = read("deploy/envoy/envoy-client-certs.yaml");
    let chain = certs["static_resources"]["listeners"][0]["filter_chains"][0]
        .as_mapping_mut()
        .unwrap();
    let tls = chain
        .remove("transport_socket")
        .expect("the listener terminates TLS");
    let context = &tls["typed_config"];
    assert_eq!(
        context["require_client_certificate"].as_bool(),
        Some(false),
        "clients without a certificate still connect; their tokens decide"
    );
    assert!(
        context["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
            .as_str()
            .is_some(),
        "client certificates are verified against a CA"
    );
    let filters =
        certs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"]
            .as_sequence_mut()
            .unwrap();
    let ext_authz = filters[0]["typed_config"].as_mapping_mut().unwrap();
    assert_eq!(
        ext_authz
            .remove("include_peer_certificate")
            .and_then(|v| v.as_bool()),
        Some(true),
        "the certificate reaches the sidecar"
    );
    assert_eq!(certs, plain, "apart from those two, the examples are equal");
}

#[test]
fn the_in_envoy_example_is_the_gateway_with_the_module_in_place_of_ext_authz() {
    let plain = read("deploy/envoy/envoy.yaml");
    let mut module = read("deploy/envoy/envoy-module.yaml");
    let hcm = |config: &mut Value| -> Value {
        config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            .clone()
    };
    // The filter: the module by name, never unloaded, its config the sidecar's own settings.
    let manager = hcm(&mut module);
    let filter = &manager["http_filters"][0];
    let typed = &filter["typed_config"];
    assert_eq!(
        typed["dynamic_module_config"]["name"].as_str(),
        Some("authz_sidecar_module")
    );
    assert_eq!(
        typed["dynamic_module_config"]["do_not_close"].as_bool(),
        Some(true)
    );
    let settings = typed["filter_config"]["value"].as_mapping().unwrap();
    let sidecar_keys: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .filter(|(k, _)| {
            !["CHECK_TIMEOUT", "MODULE_THREADS", "METADATA_NAMESPACE"].contains(&k.as_str())
        })
        .collect();
    authz_sidecar::config::Settings::from_env_pairs(
        sidecar_keys.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .expect("every key of the example is one of the sidecar's settings");

    // Every route asks what it asks of ext_authz in the plain example.
    let routes = |config: &Value, key: &str| -> Vec<(String, Value)> {
        config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|route| {
                let per_filter = &route["typed_per_filter_config"][key];
                let asks = match per_filter["disabled"].as_bool() {
                    Some(true) => Value::String("disabled".into()),
                    _ if key == "authz" => per_filter["filter_config"]["value"].clone(),
                    _ => per_filter["check_settings"]["context_extensions"].clone(),
                };
                (serde_yaml_ng::to_string(&route["match"]).unwrap(), asks)
            })
            .collect()
    };
    assert_eq!(
        routes(&module, "authz"),
        routes(&plain, "envoy.filters.http.ext_authz")
    );

    // Apart from the filter, its per-route configs and the sidecar's cluster: the same gateway.
    let strip = |config: &mut Value, key: &str| {
        let manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]
            .as_mapping_mut()
            .unwrap();
        manager.remove("http_filters");
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]
            .as_sequence_mut()
            .unwrap()
        {
            if let Some(per_filter) = route.get_mut("typed_per_filter_config") {
                per_filter.as_mapping_mut().unwrap().remove(key);
            }
        }
        let clusters = config["static_resources"]["clusters"]
            .as_sequence_mut()
            .unwrap();
        clusters.retain(|c| c["name"].as_str() != Some("authz_sidecar"));
    };
    let mut plain = plain;
    strip(&mut plain, "envoy.filters.http.ext_authz");
    strip(&mut module, "authz");
    assert_eq!(module, plain);
}
