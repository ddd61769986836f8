"""Validates everything under deploy/ against real tools and the real binary.

- `kubectl kustomize` builds every overlay; the Helm chart renders with its defaults and each ci values file;
- every built-in Kubernetes object validates (strict) against the Kubernetes schemas;
- PrometheusRules pass `promtool check rules`;
- every env var the manifests set is one the binary knows, and the chart's values list all of them;
- every `ext_authz_*` metric in the dashboard and the alerts is exported by a running binary;
- copies that must not drift (dashboard, rules, the sidecar overlay's ext_authz filter) match;
- what a cluster would do with each Deployment: every probe and port reaches a listener on the
  pod IP, every *_LISTEN_ADDR on the pod IP has a containerPort, every file the binary opens is
  in a mounted volume, the startup probe is /healthz, Envoy keeps admin on loopback, normalises
  paths and sends only the headers the sidecar reads;
- the chart: each ci values file (each with its own release name) gets what it asked for
  (topology, TLS, Secrets, NetworkPolicy callers, monitoring labels, KEDA, the Istio provider
  NOTES.txt prints naming the Service it renders, back-channel logout on its own port for its
  own peers), every listener on the pod IP has a Service port and a NetworkPolicy rule, it
  refuses what it must (naming the value to set), and the README's `helm install` commands and
  deploy/istio agree with it.

    .venv/bin/python deploy/validate.py --sidecar-bin target/debug/authz-sidecar
"""

import argparse
import functools
import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.33.0"
OVERLAYS = ["gateway", "sidecar"]
CHART = DEPLOY / "helm/authz-sidecar"
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
# Each way the chart is rendered: (ci values file, release, namespace). Release names differ on
# purpose: a manifest or a mesh config that assumes the Service is called after one release name
# fails for the others.
CHART_RELEASES = [
    (None, "authz", "authz"),
    ("custom-values.yaml", "authz", "authz"),
    ("sidecar-values.yaml", "gateway", "edge"),
    ("tls-values.yaml", "authz", "authz"),
    ("existing-secret-values.yaml", "authz-sidecar", "authz"),
    ("istio-values.yaml", "edge", "payments"),
    ("redis-tls-values.yaml", "authz", "authz"),
    ("backchannel-logout-values.yaml", "sso", "identity"),
]
# Settings the chart derives from other values instead of listing them in values.env (the schema
# names them so that the templates, not the schema, refuse them with a reason).
CHART_DERIVED_ENV = {"GRPC_LISTEN_ADDR", "METRICS_LISTEN_ADDR", "GRPC_UNIX_SOCKET",
                     "BACKCHANNEL_LOGOUT_LISTEN_ADDR", "BACKCHANNEL_LOGOUT_CLIENT_ID", "BACKCHANNEL_LOGOUT_ISSUERS"}
RENDERINGS = []

# API groups of custom resources: no upstream schema to validate them against.
CRD_GROUPS = {"monitoring.coreos.com", "cert-manager.io", "keda.sh", "security.istio.io", "install.istio.io"}

failures = []
passed = 0


def check(condition, message):
    global passed
    if condition:
        passed += 1
    else:
        failures.append(message)
        print(f"FAIL {message}")


def documents(text):
    return [doc for doc in yaml.safe_load_all(text) if doc]


def build_sources(venv_bin):
    """(label, list of objects) for every way the manifests are produced."""
    sources = []
    for overlay in OVERLAYS:
        out = subprocess.run([str(venv_bin / "kubectl"), "kustomize", str(DEPLOY / "k8s/overlays" / overlay)],
                             capture_output=True, text=True)
        check(out.returncode == 0, f"kustomize {overlay}: {out.stderr.strip()}")
        sources.append((f"kustomize/{overlay}", documents(out.stdout)))
    sources.append(("hpa.yaml", documents((DEPLOY / "hpa.yaml").read_text())))
    for rendering in render_chart():
        sources.append((rendering.label, rendering.objects))
    for values in [None] + [yaml.safe_load(path.read_text()) for path in sorted(CHART.glob("ci/*values.yaml"))]:
        lint = helm.lint(str(CHART), values, strict=True)
        check(not lint["errors"] and all(m["severity"] < 2 for m in lint["messages"]), f"helm lint: {lint}")
    return sources


class Rendering:
    """One `helm template` of the chart: its values, release, objects and NOTES.txt."""

    def __init__(self, label, values, release, namespace):
        self.label, self.values, self.release, self.namespace = label, values or {}, release, namespace
        rendered = helm.Chart.load(str(CHART)).render(values, name=release, namespace=namespace, is_install=True)
        self.notes = next((text for path, text in rendered.items() if path.endswith("/NOTES.txt")), "")
        self.objects = [doc for path, text in rendered.items() if not path.endswith("/NOTES.txt")
                        for doc in documents(text)]
        for obj in self.objects:
            obj["metadata"].setdefault("namespace", namespace)

    def value(self, dotted, default=None):
        """The effective value: the ci file's, else the chart's default."""
        for source in (self.values, CHART_DEFAULTS):
            node = source
            for key in dotted.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                return node
        return default

    def kinds(self, kind):
        return [o for o in self.objects if o["kind"] == kind]


def render_chart():
    """Every rendering CHART_RELEASES names, each ci values file with its own release."""
    listed = {file for file, _, _ in CHART_RELEASES if file}
    present = {path.name for path in CHART.glob("ci/*values.yaml")}
    check(listed == present, f"CHART_RELEASES names every ci values file: missing {sorted(present - listed)}")
    renderings = []
    for file, release, namespace in CHART_RELEASES:
        values = yaml.safe_load((CHART / "ci" / file).read_text()) if file else None
        label = "helm/" + (file.removesuffix("-values.yaml") if file else "default")
        try:
            renderings.append(Rendering(label, values, release, namespace))
        except helm.HelmError as e:
            check(False, f"{label}: does not render: {e}")
    global RENDERINGS
    RENDERINGS = renderings
    return renderings


def validate_schemas(venv_bin, sources, workdir):
    files = []
    for label, objects in sources:
        for i, obj in enumerate(objects):
            if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
                continue  # CRDs: checked below (rules by promtool, the others structurally)
            path = workdir / f"{label.replace('/', '_')}-{i}-{obj['kind']}.yaml"
            path.write_text(yaml.safe_dump(obj))
            files.append(path)
    out = subprocess.run([str(venv_bin / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION,
                          *map(str, files)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    for path in files:
        line = next((l for l in report.splitlines() if str(path) in l), "")
        check(" passed " in line, f"schema: {path.name}: {line or 'no result'}")


def validate_rules(sources, workdir):
    """promtool accepts every rendered PrometheusRule and passes deploy/prometheus/tests/ against it;
    every alert has a test where it fires and one where it stays quiet, a runbook_url naming a
    section of RUNBOOK.md, and, when it is a ratio of Checks, a minimum-traffic clause."""
    rule_sets = {}  # the rules as promtool reads them -> (first rendering with them, their file)
    for label, objects in sources:
        for obj in objects:
            if obj["kind"] == "PrometheusRule":
                path = workdir / f"rules-{label.replace('/', '_')}.yaml"
                path.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}))
                out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
                check(out.returncode == 0, f"promtool {label}: {out.stdout}{out.stderr}")
                rule_sets.setdefault(path.read_text(), (label, path))
            if obj["kind"] == "ServiceMonitor":
                endpoints = obj["spec"].get("endpoints", [])
                check(endpoints and all(e.get("port") == "metrics" for e in endpoints),
                      f"{label}: ServiceMonitor scrapes the `metrics` port")

    tests = sorted((DEPLOY / "prometheus/tests").glob("*.yaml"))
    check(tests, "promtool unit tests in deploy/prometheus/tests/")
    firing, quiet = set(), set()
    for test in tests:
        for case in yaml.safe_load(test.read_text())["tests"]:
            for alert_test in case.get("alert_rule_test", []):
                (firing if alert_test.get("exp_alerts") else quiet).add(alert_test["alertname"])
    headings = re.findall(r"^#+ (.+)$", (ROOT / "RUNBOOK.md").read_text(), re.M)
    # GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens.
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    for text, (label, path) in rule_sets.items():
        # The tests name the chart's file; here they run against what this rendering produced.
        for test in tests:
            spec = yaml.safe_load(test.read_text())
            spec["rule_files"] = [str(path)]
            test_path = workdir / f"{path.stem}-test-{test.name}"
            test_path.write_text(yaml.safe_dump(spec))
            out = subprocess.run(["promtool", "test", "rules", str(test_path)], capture_output=True, text=True)
            check(out.returncode == 0, f"promtool test rules {test.name} on {label}: {out.stdout}{out.stderr}")
        for rule in (r for group in yaml.safe_load(text)["groups"] for r in group["rules"] if "alert" in r):
            name, expr = rule["alert"], rule["expr"]
            check(name in firing and name in quiet,
                  f"{label}: alert {name} needs a unit test where it fires and one where it stays quiet")
            file, _, anchor = rule.get("annotations", {}).get("runbook_url", "").partition("#")
            check(file.endswith("RUNBOOK.md") and anchor in anchors,
                  f"{label}: alert {name}'s runbook_url names a section of RUNBOOK.md")
            if "ext_authz" in expr and ("/" in expr or ":ratio_" in expr):
                check(re.search(r"\band\b", expr) and re.search(r">=\s*0\.1\b", expr),
                      f"{label}: ratio alert {name} has the minimum-traffic clause (and ... >= 0.1 Checks/s)")


def binary_env_vars(sidecar_bin):
    help_text = subprocess.run([sidecar_bin, "--help"], capture_output=True, text=True, check=True).stdout
    # --help wraps lines, sometimes between `[env:` and the name: join the words first.
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", " ".join(help_text.split())))


def pod_containers(deployment):
    """Every container of a Deployment's pod, native sidecars (initContainers) included."""
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def authz_containers(objects):
    """(Deployment, container) for every authz-sidecar container."""
    return [(d, c) for d in objects if d["kind"] == "Deployment" for c in pod_containers(d)
            if c["name"] == "authz-sidecar"]


def validate_env(sources, known):
    for label, objects in sources:
        settings_maps = {ref["configMapRef"]["name"] for _, c in authz_containers(objects)
                         for ref in c.get("envFrom", []) if "configMapRef" in ref}
        for obj in objects:
            names = set()
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] in settings_maps:
                names |= set(obj.get("data", {}))
            if obj["kind"] == "Deployment":
                for container in pod_containers(obj):
                    if container["name"] == "authz-sidecar":
                        names |= {e["name"] for e in container.get("env", [])}
            unknown = names - known
            check(not unknown, f"{label} {obj['kind']}/{obj['metadata']['name']}: unknown env vars {sorted(unknown)}")
    values = set(CHART_DEFAULTS["env"])
    check(values | CHART_DERIVED_ENV == known and not values & CHART_DERIVED_ENV,
          f"chart values.env must list every setting but the derived {sorted(CHART_DERIVED_ENV)}: missing "
          f"{sorted(known - values - CHART_DERIVED_ENV)}, extra {sorted(values - known)}")
    schema_path = CHART / "values.schema.json"
    schema = json.loads(schema_path.read_text()) if schema_path.exists() else {}
    check(set(schema.get("properties", {}).get("env", {}).get("properties", {})) == values | CHART_DERIVED_ENV,
          "values.schema.json's env properties are values.env's keys and the derived settings")


def scrape_running_binary(sidecar_bin, workdir):
    subprocess.run([sidecar_bin, "dev-keys", "--dir", str(workdir / "keys")], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    env = {"PATH": os.environ.get("PATH", ""), "JWT_ISSUER": "https://validate.example",
           "JWKS_FILE": str(workdir / "keys/jwks.json"), "GRPC_LISTEN_ADDR": "127.0.0.1:0",
           "METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}", "SHUTDOWN_DRAIN_DELAY": "0s"}
    process = subprocess.Popen([sidecar_bin], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=20)


def metric_names(text, prefix="ext_authz_"):
    # Recorded series (`level:ext_authz_...:rate5m`) are not the binary's: skip names after a colon.
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(rf"(?<![\w:]){prefix}[a-z0-9_]+", text)}


def validate_metrics(sources, scrape):
    """Every ext_authz_* metric the dashboard and the rules name is exported by the binary, and
    every envoy_* one by Envoy (deploy/envoy/envoy.yaml started on free ports and scraped); the
    dashboard's queries parse and the recorded series they read are recorded by the rules."""
    exported = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    exported = {re.sub(r"_(bucket|sum|count)$", "", m) for m in exported}
    dashboard = (DEPLOY / "grafana/authz-sidecar.json").read_text()
    queries = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", [])]
    rule_specs = [obj["spec"] for _, objects in sources for obj in objects if obj["kind"] == "PrometheusRule"]
    texts = [dashboard] + [json.dumps(spec) for spec in rule_specs]
    used = set().union(*(metric_names(text) for text in texts))

    # Grafana's variables replaced by plain values, each query parses as a recording rule's expr.
    grafana = {"$__rate_interval": "5m", "$__range": "1h", "$namespace": "authz", "$job": ".+",
               "$gateway_namespace": ".+", "$authz_cluster": "authz_sidecar"}
    as_rules = [{"record": f"dashboard:query_{i}:check",
                 "expr": functools.reduce(lambda q, kv: q.replace(*kv), grafana.items(), query)}
                for i, query in enumerate(queries)]
    path = Path(tempfile.mkdtemp(prefix="authz-validate-dashboard-")) / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": as_rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    check(queries and out.returncode == 0, f"the dashboard's queries parse: {out.stdout}{out.stderr}")
    recorded = {r["record"] for spec in rule_specs for g in spec["groups"] for r in g["rules"] if "record" in r}
    read = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", " ".join(queries)))
    check(read and read <= recorded, f"the dashboard reads recorded series the rules do not record: {sorted(read - recorded)}")
    check(len(used) >= 8, f"dashboard and rules use the sidecar's metrics ({sorted(used)})")
    missing = used - exported
    check(not missing, f"dashboard/rules name metrics the binary does not export: {sorted(missing)}")
    # A bucket the latency SLO counts must exist, or its ratio is empty and its alerts never fire.
    buckets = set(re.findall(r'\b(ext_authz_\w+_bucket)\{le="([^"]+)"', scrape))
    wanted = {(m, le) for text in texts for m, le in re.findall(r'\b(ext_authz_\w+_bucket)\{[^}]*\ble=\\?"([^"\\]+)', text)}
    check(wanted and wanted <= buckets, f"dashboard/rules select histogram buckets the binary does not have: {sorted(wanted - buckets)}")

    envoy_used = set().union(*(metric_names(text, "envoy_") for text in texts))
    config = yaml.safe_load((DEPLOY / "envoy/envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    workdir = Path(tempfile.mkdtemp(prefix="authz-validate-envoy-"))
    (workdir / "envoy.yaml").write_text(yaml.safe_dump(config))
    admin = workdir / "admin-address"
    envoy = subprocess.Popen([str(Path(sys.executable).parent / "envoy"), "-c", str(workdir / "envoy.yaml"),
                              "--use-dynamic-base-id", "--admin-address-path", str(admin), "-l", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                url = f"http://{admin.read_text().strip()}/stats/prometheus"
                with urllib.request.urlopen(url, timeout=2) as r:
                    envoy_scrape = r.read().decode()
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline or envoy.poll() is not None:
                    envoy_scrape = ""
                    break
                time.sleep(0.1)
    finally:
        envoy.terminate()
        envoy.wait(timeout=20)
    # Envoy's names and its label names (a dashboard legend may show `envoy_cluster_name`).
    envoy_known = metric_names(envoy_scrape, "envoy_")
    check(envoy_used and envoy_known, "dashboard and rules use Envoy's ext_authz stats, and Envoy was scraped")
    missing = envoy_used - envoy_known
    check(not missing, f"dashboard/rules name Envoy stats Envoy does not export: {sorted(missing)}")


def validate_copies():
    check((DEPLOY / "grafana/authz-sidecar.json").read_text() == (CHART / "files/authz-sidecar.json").read_text(),
          "the chart's dashboard is a copy of deploy/grafana/authz-sidecar.json")
    base_rules = yaml.safe_load((DEPLOY / "k8s/base/prometheusrule.yaml").read_text())["spec"]["groups"]
    chart_rules = yaml.safe_load((CHART / "files/prometheus-rules.yaml").read_text())["groups"]
    check(base_rules == chart_rules, "the chart's alert rules equal deploy/k8s/base/prometheusrule.yaml")

    def ext_authz_filter(path):
        config = yaml.safe_load(path.read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm["http_filters"], hcm["route_config"], [c for c in config["static_resources"]["clusters"]
                                                          if c["name"] == "authz_sidecar"]
    check(ext_authz_filter(DEPLOY / "envoy/envoy.yaml") == ext_authz_filter(DEPLOY / "k8s/overlays/sidecar/envoy.yaml"),
          "the sidecar overlay's Envoy filters, routes and authz cluster equal deploy/envoy/envoy.yaml's")


# What a cluster would do with the rendered objects, checked without one: which listener each
# probe and Service port reaches, which volume holds each file the binary opens, what Envoy's
# configuration exposes, who a NetworkPolicy admits, what the mesh config names.

FILE_SETTINGS = ["JWKS_FILE", "REVOCATION_FILE", "CONFIG_FILE", "GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CLIENT_CA",
                 "REDIS_TLS_CA", "REDIS_TLS_CERT", "REDIS_TLS_KEY"]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def seconds(text):
    """A duration as the binary reads it (250ms, 10s, 5m, 24h; a bare number is seconds)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?\s*", str(text))
    return float(match[1]) * {"ms": 0.001, None: 1, "s": 1, "m": 60, "h": 3600}[match[2]] if match else None


def by_name(objects, kind, name):
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def container_env(objects, container):
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env.
    A value from a Secret reads `secret:<name>/<key>`."""
    env = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update((by_name(objects, "ConfigMap", ref["configMapRef"]["name"]) or {}).get("data", {}))
    for entry in container.get("env", []):
        secret = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = str(entry["value"]) if "value" in entry else (
            f"secret:{secret['name']}/{secret['key']}" if secret else "<valueFrom>")
    return env


def listen_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def listeners(env):
    """{setting: (host, port)} of every TCP listener the binary opens: GRPC_LISTEN_ADDR and
    METRICS_LISTEN_ADDR (their defaults when unset) and every other *_LISTEN_ADDR that is set
    (those are off when empty, e.g. BACKCHANNEL_LOGOUT_LISTEN_ADDR)."""
    addrs = {"GRPC_LISTEN_ADDR": "0.0.0.0:9191", "METRICS_LISTEN_ADDR": "0.0.0.0:9090"}
    addrs.update({k: v for k, v in env.items() if k.endswith("_LISTEN_ADDR") and v and not v.startswith("secret:")})
    return {k: listen_addr(v) for k, v in addrs.items()}


def resolve_port(container, port):
    """The number a probe's or Service's port (a number or a container port name) means."""
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def probe_action(probe):
    """(kind, path or gRPC service, port) of a probe."""
    for kind in ("httpGet", "grpc", "tcpSocket"):
        if kind in probe:
            action = probe[kind]
            return kind, action.get("path", action.get("service")), action["port"]
    return None, None, None


def mount_for(deployment, container, path):
    """(volumeMount, volume, path inside the volume) holding `path`, or Nones."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"].rstrip("/") or path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None, None, None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
    volume = next((v for v in volumes if v["name"] == mount["name"]), None)
    return mount, volume, path[len(mount["mountPath"].rstrip("/")) + 1:]


def file_in_volume(objects, volume, inner):
    """False when the volume is a ConfigMap rendered here that has no such file; else True
    (Secrets and ConfigMaps made by others cannot be checked here)."""
    if "configMap" not in volume:
        return True
    config_map = by_name(objects, "ConfigMap", volume["configMap"]["name"])
    if config_map is None:
        return True
    items = volume["configMap"].get("items")
    files = [i["path"] for i in items] if items else list(config_map.get("data", {}))
    return inner in files


def is_envoy(container):
    return container["name"] == "envoy" or "envoy" in container.get("image", "").split("/")[-1].split(":")[0]


def envoy_config(objects, deployment, container):
    args = container.get("command", []) + container.get("args", [])
    path = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config-path")), None)
    if path is None:
        return None
    _, volume, inner = mount_for(deployment, container, path)
    if not volume or "configMap" not in volume:
        return None
    text = (by_name(objects, "ConfigMap", volume["configMap"]["name"]) or {}).get("data", {}).get(inner)
    return yaml.safe_load(text) if text else None


def envoy_listeners(config):
    """{port: address} of Envoy's listeners (admin not included)."""
    return {int(l["address"]["socket_address"]["port_value"]): l["address"]["socket_address"]["address"]
            for l in config.get("static_resources", {}).get("listeners", []) if "socket_address" in l["address"]}


def http_managers(config):
    for listener in config.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    yield listener["name"], f["typed_config"]


def ext_authz_filter(hcm):
    return next((f["typed_config"] for f in hcm.get("http_filters", []) if f["name"] == "envoy.filters.http.ext_authz"), None)


def selects(selector, labels):
    """A label selector (matchLabels only; matchExpressions never match here) against labels."""
    if selector is None:
        return False
    if selector.get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admits(peer, pod, policy_namespace):
    """Whether a NetworkPolicy peer admits `pod` ({labels, namespace, namespace_labels}, or an
    address outside the cluster: {ip})."""
    if "ipBlock" in peer:
        if "ip" not in pod:
            return False
        address, block = ipaddress.ip_address(pod["ip"]), peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and \
            not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if "ip" in pod:
        return False
    namespace_ok = (selects(peer["namespaceSelector"], pod["namespace_labels"]) if "namespaceSelector" in peer
                    else pod["namespace"] == policy_namespace)
    pod_ok = selects(peer["podSelector"], pod["labels"]) if "podSelector" in peer else True
    return namespace_ok and pod_ok


def admitted(policies, pod_labels, port, caller):
    """Whether the NetworkPolicies selecting a pod let `caller` reach `port` (TCP)."""
    applying = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(admits(peer, caller, policy["metadata"].get("namespace")) for peer in peers):
                return True
    return False


def caller(namespace, labels, **namespace_labels):
    return {"namespace": namespace, "labels": labels,
            "namespace_labels": {"kubernetes.io/metadata.name": namespace, **namespace_labels}}


# Who calls Check: a standalone Envoy gateway, Istio's ingress gateway, a mesh workload's proxy.
CHECK_CALLERS = {
    "an Envoy gateway pod": caller("edge", {"app.kubernetes.io/component": "gateway"}),
    "Istio's ingress gateway": caller("istio-system", {"istio": "ingressgateway", "app": "istio-ingressgateway"}),
    "a mesh workload (injected namespace)": caller("orders", {"app": "orders"}, **{"istio-injection": "enabled"}),
}
NOT_A_CALLER = caller("scratch", {"app": "debug"})
# An address on the internet (TEST-NET-2), as a LoadBalancer that keeps client addresses shows it.
SOMEONE_OUTSIDE = {"ip": "198.51.100.7"}


def peer_example(peer, policy_namespace):
    """A pod (or an outside address) that a NetworkPolicy peer is meant to admit."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        excluded = [ipaddress.ip_network(e) for e in block.get("except", [])]
        network = ipaddress.ip_network(block["cidr"])
        for address in (network[i] for i in range(min(network.num_addresses, 256))):
            if not any(address in e for e in excluded):
                return {"ip": str(address)}
        return {"ip": str(network[0])}
    namespace_labels = dict((peer.get("namespaceSelector") or {}).get("matchLabels", {}))
    namespace = namespace_labels.pop("kubernetes.io/metadata.name",
                                     policy_namespace if "namespaceSelector" not in peer else "idp")
    return caller(namespace, dict((peer.get("podSelector") or {}).get("matchLabels", {})), **namespace_labels)


def validate_pods(sources, venv_bin, workdir):
    """Every Deployment of every source: probes, ports, files, sockets, Envoy, shutdown."""
    for label, objects in sources:
        for deployment in (o for o in objects if o["kind"] == "Deployment"):
            where = f"{label} Deployment/{deployment['metadata']['name']}"
            containers = pod_containers(deployment)
            authz = next((c for c in containers if c["name"] == "authz-sidecar"), None)
            authz_env = container_env(objects, authz) if authz else {}
            listening = {}  # port -> (container, bound address)
            if authz:
                for host, port in listeners(authz_env).values():
                    listening[port] = ("authz-sidecar", host)
                validate_authz_container(where, objects, deployment, authz, authz_env, listening)
            for envoy in (c for c in containers if is_envoy(c)):
                config = envoy_config(objects, deployment, envoy)
                check(config is not None, f"{where}: Envoy's -c file is a key of a ConfigMap mounted into it")
                if config is None:
                    continue
                admin = config.get("admin", {}).get("address", {}).get("socket_address", {})
                check(admin.get("address") in LOOPBACK,
                      f"{where}: Envoy's admin interface listens on loopback only (it is {admin.get('address')})")
                for port, address in envoy_listeners(config).items():
                    listening.setdefault(port, (envoy["name"], address))
                validate_envoy_config(where, config, authz_env, venv_bin, workdir / f"{label.replace('/', '_')}-envoy.yaml")
            # Probes reach a listener bound to the pod's address (the kubelet probes the pod IP).
            for container in containers:
                for kind in PROBES:
                    if kind not in container:
                        continue
                    action, _, port = probe_action(container[kind])
                    if action is None:
                        continue  # exec: runs inside the container, no listener involved
                    number = resolve_port(container, port)
                    owner, address = listening.get(number, (None, None))
                    check(number is not None and owner is not None and address not in LOOPBACK,
                          f"{where}: {container['name']}'s {kind} (port {port}) reaches a listener on the pod IP "
                          f"(listeners: { {p: a for p, (_, a) in listening.items()} })")
                for declared in container.get("ports", []):
                    owner, address = listening.get(declared["containerPort"], (None, None))
                    check(owner == container["name"] and address not in LOOPBACK,
                          f"{where}: {container['name']} declares port {declared.get('name')}/{declared['containerPort']}, "
                          f"which it does not listen on for the pod IP")
            # Every Service port selecting this pod ends at a container port.
            labels = deployment["spec"]["template"]["metadata"].get("labels", {})
            for service in (o for o in objects if o["kind"] == "Service"):
                if not service["spec"].get("selector") or not selects({"matchLabels": service["spec"]["selector"]}, labels):
                    continue
                for port in service["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    check(any(resolve_port(c, target) in {p["containerPort"] for p in c.get("ports", [])} for c in containers),
                          f"{where}: Service/{service['metadata']['name']} port {port.get('name')} targets {target}, "
                          f"a port no container declares")
            # The grace period covers preStop, the drain delay and in-flight Checks.
            if authz:
                pre_stop = max((c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                                for c in containers), default=0)
                needed = pre_stop + seconds(authz_env.get("SHUTDOWN_DRAIN_DELAY") or "5s") + \
                    seconds(authz_env.get("SHUTDOWN_TIMEOUT") or "10s")
                grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                check(grace >= needed, f"{where}: terminationGracePeriodSeconds {grace} < preStop + drain + timeout ({needed} s)")
        for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
            for key, value in config_map.get("data", {}).items():
                check(not re.search(r"[a-z][a-z0-9+.-]*://[^/\s@]*:[^/\s@]*@", str(value)),
                      f"{label} ConfigMap/{config_map['metadata']['name']}: {key} carries a password (use a Secret)")


def validate_authz_container(where, objects, deployment, container, env, listening):
    grpc_host, grpc_port = listen_addr(env.get("GRPC_LISTEN_ADDR") or "0.0.0.0:9191")
    probes = {kind: probe_action(container[kind]) for kind in PROBES if kind in container}
    readiness_like = lambda action: action[0] == "grpc" or (action[0] == "httpGet" and action[1] == "/readyz")
    if "startupProbe" in probes:
        check(probes["startupProbe"][:2] == ("httpGet", "/healthz"),
              f"{where}: the startup probe is httpGet /healthz (the process is up), not readiness: with Redis or "
              f"the IdP down past its window, every new pod would crash-loop (it is {probes['startupProbe'][:2]})")
    if "livenessProbe" in probes:
        check(not readiness_like(probes["livenessProbe"]), f"{where}: the liveness probe does not depend on readiness")
    check("readinessProbe" in probes and readiness_like(probes["readinessProbe"]),
          f"{where}: the readiness probe is /readyz or gRPC health")
    if env.get("GRPC_TLS_CERT") and "readinessProbe" in probes:
        check(probes["readinessProbe"][0] != "grpc",
              f"{where}: TLS on the Check listener, so readiness is not a kubelet gRPC probe (it cannot speak TLS)")
    for declared in container.get("ports", []):
        if declared.get("name") == "grpc":
            check(declared["containerPort"] == grpc_port,
                  f"{where}: containerPort grpc ({declared['containerPort']}) is GRPC_LISTEN_ADDR's port ({grpc_port})")
    # A listener on the pod IP that no containerPort declares: a Service or a NetworkPolicy rule
    # naming it by port name cannot exist, so the chart's own objects never reach it.
    declared_ports = {p["containerPort"] for p in container.get("ports", [])}
    for var, (host, port) in listeners(env).items():
        if host not in LOOPBACK:
            check(port in declared_ports, f"{where}: {var} listens on {host}:{port}, "
                                          f"which authz-sidecar declares no containerPort for")
    for var in FILE_SETTINGS:
        path = env.get(var)
        if not path:
            continue
        mount, volume, inner = mount_for(deployment, container, path)
        check(volume is not None, f"{where}: {var}={path} lies in no volume mounted into authz-sidecar "
                                  f"(the binary would exit 64 at startup)")
        if volume is not None:
            check(file_in_volume(objects, volume, inner), f"{where}: {var}={path}: the ConfigMap mounted there has no {inner}")
    socket_path = env.get("GRPC_UNIX_SOCKET")
    if socket_path:
        mount, volume, _ = mount_for(deployment, container, os.path.dirname(socket_path))
        check(volume is not None and "emptyDir" in volume and not mount.get("readOnly"),
              f"{where}: GRPC_UNIX_SOCKET={socket_path} lies in a writable emptyDir")
        others = [c["name"] for c in pod_containers(deployment) if c is not container
                  and mount_for(deployment, c, socket_path)[1] is volume and volume is not None]
        check(others, f"{where}: another container mounts the socket's emptyDir (who else would call it?)")
    redis_url = env.get("REDIS_URL", "")
    check(not re.search(r"://[^/]*@", redis_url) or redis_url.startswith("secret:"),
          f"{where}: REDIS_URL with credentials comes from a Secret")


def validate_envoy_config(where, config, authz_env, venv_bin, path):
    token_header = (authz_env.get("TOKEN_HEADER") or "authorization").lower()
    for name, hcm in http_managers(config):
        ext_authz = ext_authz_filter(hcm)
        if ext_authz is None:
            continue
        check(hcm.get("normalize_path") is True and hcm.get("merge_slashes") is True
              and hcm.get("path_with_escaped_slashes_action") in ("UNESCAPE_AND_REDIRECT", "REJECT_REQUEST"),
              f"{where}: Envoy listener {name} normalises paths (normalize_path, merge_slashes, "
              f"path_with_escaped_slashes_action) before routes and the Check see them")
        patterns = ext_authz.get("allowed_headers", {}).get("patterns", [])
        sent = {p.get("exact", "").lower() for p in patterns}
        reads = {token_header, "cookie", "dpop", "x-forwarded-for"}
        if (authz_env.get("DPOP_TRUST_FORWARDED_PROTO") or "false").lower() == "true":
            reads.add("x-forwarded-proto")
        check(sent == reads and all("exact" in p for p in patterns),
              f"{where}: Envoy listener {name} sends the sidecar only the headers it reads "
              f"({', '.join(sorted(reads))}), not {sorted(sent) or 'every header'}")
        check(ext_authz.get("failure_mode_allow") is False, f"{where}: ext_authz fails closed")
    clusters = {c["name"]: c for c in config.get("static_resources", {}).get("clusters", [])}
    if authz_env and "authz_sidecar" in clusters:
        address = clusters["authz_sidecar"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        socket_path = authz_env.get("GRPC_UNIX_SOCKET")
        if "pipe" in address:
            check(address["pipe"]["path"] == socket_path,
                  f"{where}: Envoy's authz_sidecar cluster is the sidecar's GRPC_UNIX_SOCKET ({socket_path})")
        else:
            host, port = listen_addr(authz_env.get("GRPC_LISTEN_ADDR") or "0.0.0.0:9191")
            check(address["socket_address"]["port_value"] == port,
                  f"{where}: Envoy's authz_sidecar cluster port is GRPC_LISTEN_ADDR's")
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(venv_bin / "envoy"), "--mode", "validate", "-c", str(path)], capture_output=True, text=True)
    check(out.returncode == 0, f"{where}: envoy --mode validate: {out.stdout[-500:]}{out.stderr[-500:]}")


def notes_provider(notes):
    """The extensionProviders entry NOTES.txt prints, parsed."""
    lines = notes.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == "extensionProviders:"), None)
    if start is None:
        return None
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    indent = len(block[0]) - len(block[0].lstrip())
    return yaml.safe_load("\n".join(l[indent:] for l in block))["extensionProviders"][0]


def validate_chart(renderings):
    """What each chart rendering promises, against what its values asked for."""
    for r in renderings:
        where = r.label
        deployments = r.kinds("Deployment")
        services = r.kinds("Service")
        check(len(deployments) == 1 and len(services) == 1, f"{where}: one Deployment and one Service")
        if not deployments or not services:
            continue
        deployment, service = deployments[0], services[0]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        authz = next((c for c in pod_containers(deployment) if c["name"] == "authz-sidecar"), None)
        env = container_env(r.objects, authz)
        check("startupProbe" in authz, f"{where}: authz-sidecar has a startup probe")
        # Topology.
        if r.value("topology") == "sidecar":
            init = deployment["spec"]["template"]["spec"].get("initContainers", [])
            check(authz in init and authz.get("restartPolicy") == "Always",
                  f"{where}: topology sidecar runs authz-sidecar as a native sidecar (initContainers, restartPolicy Always)")
            check(any(is_envoy(c) for c in deployment["spec"]["template"]["spec"]["containers"]),
                  f"{where}: topology sidecar runs Envoy as the main container")
            check(bool(env.get("GRPC_UNIX_SOCKET")), f"{where}: topology sidecar: Check over GRPC_UNIX_SOCKET")
        # Monitoring objects carry the labels their selectors look for.
        for kind, key in (("ServiceMonitor", "serviceMonitor"), ("PrometheusRule", "prometheusRule"),
                          ("PodMonitor", "serviceMonitor")):
            wanted = r.value(f"{key}.additionalLabels", {})
            for obj in r.kinds(kind):
                check(wanted.items() <= obj["metadata"]["labels"].items(), f"{where}: {kind} carries {key}.additionalLabels {wanted}")
            if kind != "PodMonitor":
                check(bool(r.kinds(kind)) == bool(r.value(f"{key}.enabled")), f"{where}: {kind} rendered iff {key}.enabled")
        for monitor in r.kinds("PodMonitor"):
            check(selects(monitor["spec"]["selector"], pod_labels), f"{where}: the PodMonitor selects the pods")
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                check(any(resolve_port(c, endpoint["port"]) for c in pod_containers(deployment)),
                      f"{where}: the PodMonitor scrapes a declared port ({endpoint['port']})")
        for dashboard in (o for o in r.kinds("ConfigMap") if o["metadata"]["name"].endswith("-dashboard")):
            check(r.value("dashboard.labels").items() <= dashboard["metadata"]["labels"].items(),
                  f"{where}: the dashboard ConfigMap carries the Grafana sidecar's label {r.value('dashboard.labels')}")
            check(dashboard["metadata"]["namespace"] == (r.value("dashboard.namespace") or r.namespace),
                  f"{where}: the dashboard ConfigMap goes to dashboard.namespace")
        # NetworkPolicies: scoped to this release, and every kind of Check caller admitted.
        policies = r.kinds("NetworkPolicy")
        for policy in policies:
            check(policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/instance") == r.release,
                  f"{where}: NetworkPolicy/{policy['metadata']['name']} selects this release's pods only")
        # Every listener the sidecar opens on the pod IP is one the chart exposes: a Service port
        # ends at it, and under a NetworkPolicy an ingress rule names its port (a port no rule
        # names is closed to every caller).
        targets = {resolve_port(authz, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
        for var, (host, port) in listeners(env).items():
            if host in LOOPBACK:
                continue
            check(port in targets, f"{where}: {var} listens on port {port}, which no port of "
                                   f"Service/{service['metadata']['name']} targets")
            if policies:
                check(any(not rule.get("ports") or any(resolve_port(authz, p.get("port")) == port for p in rule["ports"])
                          for policy in policies for rule in policy["spec"].get("ingress", [])),
                      f"{where}: {var} listens on port {port}, which no ingress rule of the NetworkPolicy admits")
        validate_logout(r, authz, env, deployment, service, policies)
        if policies and r.value("topology", "gateway") == "gateway":
            grpc_port = service["spec"]["ports"][0]["port"]
            for who, pod in CHECK_CALLERS.items():
                check(admitted(policies, pod_labels, grpc_port, pod), f"{where}: the NetworkPolicy lets {who} call Check")
            check(not admitted(policies, pod_labels, grpc_port, NOT_A_CALLER),
                  f"{where}: the NetworkPolicy keeps other pods from calling Check")
        # Secrets.
        secret = r.value("redis.existingSecret")
        if secret:
            check(env.get("REDIS_URL") == f"secret:{secret}/{r.value('redis.existingSecretKey')}",
                  f"{where}: REDIS_URL comes from Secret {secret}")
            check(all("REDIS_URL" not in o.get("data", {}) for o in r.kinds("ConfigMap")),
                  f"{where}: with redis.existingSecret, no ConfigMap holds REDIS_URL")
        # TLS from cert-manager: the Certificate's Secret is what the pod mounts.
        if r.value("tls.enabled"):
            volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
            mounted = {v["secret"]["secretName"] for v in volumes if "secret" in v}
            for certificate in r.kinds("Certificate"):
                spec = certificate["spec"]
                check(spec["secretName"] in mounted and spec["issuerRef"].get("name"),
                      f"{where}: the Certificate's Secret is mounted and it names an issuer")
                check(f"{service['metadata']['name']}.{r.namespace}.svc.cluster.local" in spec.get("dnsNames", []),
                      f"{where}: the Certificate covers the Service's name")
            check(bool(r.kinds("Certificate")) == bool(r.value("tls.certManager.enabled")),
                  f"{where}: a Certificate is rendered iff tls.certManager.enabled")
            check(all(env.get(v, "").startswith("/") for v in ("GRPC_TLS_CERT", "GRPC_TLS_KEY")),
                  f"{where}: tls.enabled sets GRPC_TLS_CERT and GRPC_TLS_KEY")
        # Autoscaling: one owner of the replica count.
        scaled = r.kinds("ScaledObject")
        check(len(scaled) + len(r.kinds("HorizontalPodAutoscaler")) <= 1, f"{where}: at most one autoscaler")
        for obj in scaled:
            trigger = obj["spec"]["triggers"][0]
            check(obj["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
                  and "ext_authz_requests_total" in trigger["metadata"]["query"]
                  and float(trigger["metadata"]["threshold"]) > 0,
                  f"{where}: the ScaledObject scales the Deployment on Checks/s")
        if scaled or r.kinds("HorizontalPodAutoscaler"):
            check("replicas" not in deployment["spec"], f"{where}: no replicas field fighting the autoscaler")
        # Istio: the provider NOTES.txt prints names the Service this release renders.
        if r.value("istio.enabled"):
            provider = notes_provider(r.notes)
            check(provider is not None, f"{where}: NOTES.txt prints the mesh config's extensionProviders entry")
            host = f"{service['metadata']['name']}.{r.namespace}.svc.cluster.local"
            grpc = (provider or {}).get("envoyExtAuthzGrpc", {})
            check(grpc.get("service") == host and grpc.get("port") == service["spec"]["ports"][0]["port"],
                  f"{where}: the provider NOTES.txt prints ({grpc.get('service')}:{grpc.get('port')}) is the Service "
                  f"the chart renders ({host}:{service['spec']['ports'][0]['port']})")
            check(grpc.get("failOpen") is False and grpc.get("statusOnError") == "503",
                  f"{where}: the provider fails closed with a 503")
            policies = r.kinds("AuthorizationPolicy")
            check(len(policies) == 1, f"{where}: istio.enabled renders an AuthorizationPolicy")
            for policy in policies:
                spec = policy["spec"]
                check(spec.get("action") == "CUSTOM" and spec.get("provider", {}).get("name") == (provider or {}).get("name")
                      and spec.get("rules"), f"{where}: the AuthorizationPolicy is CUSTOM, names the provider, has a rule")
                own = policy["metadata"]["namespace"] == r.namespace and selects(spec.get("selector", {}), pod_labels)
                check(not own, f"{where}: the AuthorizationPolicy does not cover the sidecar's own pods")
    # The chart's gateway Envoy calls the sidecar the way the example gateway does.
    def ext_authz_settings(config):
        filters = [ext_authz_filter(hcm) for _, hcm in http_managers(config)]
        return [{k: v for k, v in f.items() if k != "grpc_service"} for f in filters if f]
    example = ext_authz_settings(yaml.safe_load((DEPLOY / "envoy/envoy.yaml").read_text()))
    for r in renderings:
        for config_map in (o for o in r.kinds("ConfigMap") if "envoy.yaml" in o.get("data", {})):
            check(ext_authz_settings(yaml.safe_load(config_map["data"]["envoy.yaml"]))[:1] == example[:1],
                  f"{r.label}: the chart's ext_authz filter, but for its target, is deploy/envoy/envoy.yaml's")
    # The ci files cover what the chart offers, including a release that is not `authz`.
    covered = lambda predicate: any(predicate(r) for r in renderings)
    for what, predicate in {
        "topology sidecar": lambda r: r.value("topology") == "sidecar",
        "TLS with cert-manager": lambda r: r.value("tls.enabled") and r.value("tls.certManager.enabled"),
        "redis.existingSecret": lambda r: r.value("redis.existingSecret"),
        "istio.enabled under a non-default release and namespace":
            lambda r: r.value("istio.enabled") and r.release != "authz" and r.namespace != "authz",
        "KEDA autoscaling": lambda r: r.value("autoscaling.keda.enabled"),
        "a revocation file": lambda r: r.value("revocationFile.enabled"),
        "back-channel logout": lambda r: r.value("backchannelLogout.enabled"),
    }.items():
        check(covered(predicate), f"a ci values file renders {what}")


def validate_logout(r, authz, env, deployment, service, policies):
    """Back-channel logout as backchannelLogout asked: off, nothing of it rendered; on, its
    listener, container port, Service port and NetworkPolicy rule all on backchannelLogout.port,
    open to backchannelLogout.from and no one else, and NOTES.txt naming the URL."""
    where = r.label
    port = r.value("backchannelLogout.port")
    logout_ports = [p for p in service["spec"]["ports"] if p.get("name") == "logout"]
    if not r.value("backchannelLogout.enabled"):
        check(not any(k.startswith("BACKCHANNEL_LOGOUT_") and k.endswith(("_LISTEN_ADDR", "_CLIENT_ID", "_ISSUERS"))
                      for k in env) and not logout_ports and resolve_port(authz, "logout") is None,
              f"{where}: backchannelLogout off: no logout listener, client id, container port or Service port")
        return
    check(env.get("BACKCHANNEL_LOGOUT_LISTEN_ADDR") == f"0.0.0.0:{port}",
          f"{where}: BACKCHANNEL_LOGOUT_LISTEN_ADDR is 0.0.0.0:backchannelLogout.port ({env.get('BACKCHANNEL_LOGOUT_LISTEN_ADDR')})")
    check(env.get("BACKCHANNEL_LOGOUT_CLIENT_ID") == r.value("backchannelLogout.clientId")
          and env.get("BACKCHANNEL_LOGOUT_ISSUERS", "") == r.value("backchannelLogout.issuers", ""),
          f"{where}: BACKCHANNEL_LOGOUT_CLIENT_ID/_ISSUERS are backchannelLogout.clientId/.issuers")
    check(resolve_port(authz, "logout") == port, f"{where}: authz-sidecar declares containerPort `logout` = {port}")
    check(len(logout_ports) == 1 and logout_ports[0]["port"] == port
          and resolve_port(authz, logout_ports[0].get("targetPort")) == port,
          f"{where}: Service/{service['metadata']['name']} has a port `logout` ({port}) ending at the logout listener")
    host = f"{service['metadata']['name']}.{r.namespace}.svc.cluster.local"
    check(f"http://{host}:{port}/backchannel-logout" in r.notes, f"{where}: NOTES.txt names the URL to register at the IdP")
    if not policies:
        return
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    peers = r.value("backchannelLogout.from")
    other_ports = {p for h, p in listeners(env).values() if h not in LOOPBACK and p != port}
    for peer in peers:
        example = peer_example(peer, r.namespace)
        check(admitted(policies, pod_labels, port, example),
              f"{where}: the NetworkPolicy lets backchannelLogout.from peer {peer} reach the logout port")
        for other in sorted(other_ports):
            check(not admitted(policies, pod_labels, other, example),
                  f"{where}: backchannelLogout.from peer {peer} reaches port {other} too (only {port} is meant)")
    strangers = {**CHECK_CALLERS, "an unrelated pod": NOT_A_CALLER, "an address outside the cluster": SOMEONE_OUTSIDE}
    for who, pod in strangers.items():
        if not any(admits(peer, pod, r.namespace) for peer in peers):
            check(not admitted(policies, pod_labels, port, pod), f"{where}: the NetworkPolicy keeps {who} from the logout port")


def validate_logout_notes():
    """NOTES.txt warns when a logout cannot reach every replica (the memory backend with more
    than one pod possible) and stays quiet when it can, as the README's back-channel logout
    section says."""
    on = {"enabled": True, "clientId": "orders-api"}
    cases = [
        ("memory backend under the HPA", {"env": {"REVOCATION_BACKEND": "memory"}}, True),
        ("memory backend under KEDA", {"env": {"REVOCATION_BACKEND": "memory"},
                                       "autoscaling": {"enabled": False, "keda": {"enabled": True}}}, True),
        ("memory backend, 3 fixed replicas", {"env": {"REVOCATION_BACKEND": "memory"},
                                              "autoscaling": {"enabled": False}, "replicaCount": 3}, True),
        ("memory backend, one replica", {"env": {"REVOCATION_BACKEND": "memory"},
                                         "autoscaling": {"enabled": False}, "replicaCount": 1}, False),
        ("Redis backend under the HPA", {"env": {"REVOCATION_BACKEND": "redis"}}, False),
    ]
    for what, values, warned in cases:
        try:
            rendering = Rendering(what, {**values, "backchannelLogout": on}, "authz", "authz")
        except helm.HelmError as e:
            check(False, f"back-channel logout with {what} does not render: {e}")
            continue
        said = re.search(r"WARNING: REVOCATION_BACKEND=memory with up to \d+ replicas", rendering.notes) is not None
        check(said == warned, f"back-channel logout with {what}: NOTES.txt {'warns' if warned else 'does not warn'} "
                              f"that a logout reaches one replica only")


# Values the chart must refuse (helm install fails with the reason) rather than render.
REFUSED_VALUES = {
    "a grace period shorter than preStop + drain + timeout": {"terminationGracePeriodSeconds": 10},
    "a REDIS_URL with a password (it would sit in a ConfigMap)": {"env": {"REDIS_URL": "redis://:hunter2@redis:6379"}},
    "GRPC_LISTEN_ADDR set apart from service.grpcPort": {"env": {"GRPC_LISTEN_ADDR": "0.0.0.0:9191"}},
    "an unknown topology": {"topology": "both"},
    "a misspelt value": {"servicemonitor": {"enabled": False}},
    "Redis TLS files beside a plaintext REDIS_URL": {"redis": {"tls": {"secretName": "redis-ca"}}},
    "REDIS_TLS_CA in env beside redis.tls": {
        "redis": {"tls": {"secretName": "redis-ca"}},
        "env": {"REDIS_URL": "rediss://redis:6380", "REDIS_TLS_CA": "/x/ca.crt"}},
    "an AuthorizationPolicy covering the sidecar's own namespace": {"istio": {"enabled": True}},
    "BACKCHANNEL_LOGOUT_LISTEN_ADDR under env": {"env": {"BACKCHANNEL_LOGOUT_LISTEN_ADDR": "0.0.0.0:8090"}},
    "BACKCHANNEL_LOGOUT_CLIENT_ID under env": {"env": {"BACKCHANNEL_LOGOUT_CLIENT_ID": "orders-api"}},
    "back-channel logout without a client id": {"backchannelLogout": {"enabled": True}},
    "back-channel logout on the metrics port": {"backchannelLogout": {"enabled": True, "clientId": "a", "port": 9090}},
    "back-channel logout on the sidecar topology's Envoy port": {
        "topology": "sidecar", "backchannelLogout": {"enabled": True, "clientId": "a", "port": 8080}},
    "back-channel logout with no one admitted by the NetworkPolicy": {
        "backchannelLogout": {"enabled": True, "clientId": "a", "from": []}},
    "back-channel logout writing into the chart's read-only revocation file": {
        "env": {"REVOCATION_BACKEND": "memory"}, "revocationFile": {"enabled": True},
        "backchannelLogout": {"enabled": True, "clientId": "a"}},
}
# What a refusal's message must name: the value to set instead (a schema error would not).
REFUSAL_NAMES = {
    "GRPC_LISTEN_ADDR set apart from service.grpcPort": "service.grpcPort",
    "BACKCHANNEL_LOGOUT_LISTEN_ADDR under env": "backchannelLogout.port",
    "BACKCHANNEL_LOGOUT_CLIENT_ID under env": "backchannelLogout.clientId",
    "back-channel logout without a client id": "backchannelLogout.clientId",
    "back-channel logout on the metrics port": "service.metricsPort",
    "back-channel logout on the sidecar topology's Envoy port": "envoy.port",
    "back-channel logout with no one admitted by the NetworkPolicy": "backchannelLogout.from",
    "back-channel logout writing into the chart's read-only revocation file": "revocationFile",
}


def validate_overlays(sources):
    """The kustomize side of what validate_chart checks: who may call Check, who may reach
    Redis, and one owner of the replica count."""
    hpa = yaml.safe_load((DEPLOY / "hpa.yaml").read_text())
    scaled = hpa["spec"]["scaleTargetRef"]["name"]
    for label, objects in sources:
        if not label.startswith("kustomize/"):
            continue
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        for deployment in (o for o in objects if o["kind"] == "Deployment"):
            where = f"{label} Deployment/{deployment['metadata']['name']}"
            if deployment["metadata"]["name"] == scaled:
                check("replicas" not in deployment["spec"],
                      f"{where}: no replicas field: deploy/hpa.yaml owns the count (kubectl apply -k would reset it)")
            pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            grpc = next((p["containerPort"] for c in pod_containers(deployment) if c["name"] == "authz-sidecar"
                         for p in c.get("ports", []) if p.get("name") == "grpc"), None)
            guarded = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
            if grpc is None or not guarded:
                continue
            for who, pod in CHECK_CALLERS.items():
                check(admitted(policies, pod_labels, grpc, pod), f"{where}: the NetworkPolicy lets {who} call Check")
            check(not admitted(policies, pod_labels, grpc, NOT_A_CALLER),
                  f"{where}: the NetworkPolicy keeps other pods from calling Check")
        for policy in policies:
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if selector.get("app.kubernetes.io/name") != "redis":
                continue
            where = f"{label} NetworkPolicy/{policy['metadata']['name']}"
            check("app.kubernetes.io/instance" in selector,
                  f"{where}: selects this deployment's Redis only (an instance label), not every Redis pod")
            peer = caller(policy["metadata"].get("namespace", "authz"), dict(selector))
            writer = caller(policy["metadata"].get("namespace", "authz"), {"authz-sidecar/revocation-writer": "true"})
            for port, what in ((6379, "replication"), (26379, "Sentinel")):
                check(admitted([policy], selector, port, peer), f"{where}: its own Redis pods reach each other ({what}, {port})")
            check(admitted([policy], selector, 6379, writer), f"{where}: revocation writers reach Redis")


def validate_refusals():
    for what, values in REFUSED_VALUES.items():
        try:
            helm.Chart.load(str(CHART)).render(values, name="authz", namespace="authz", is_install=True)
            check(False, f"the chart refuses {what}")
        except helm.HelmError as e:
            check(REFUSAL_NAMES.get(what, "") in str(e), f"the chart refuses {what}, naming {REFUSAL_NAMES.get(what)}: {e}")


def readme_installs():
    """Every `helm install` in the README, as (release, namespace, values)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    installs = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("helm install "):
            continue
        words = shlex.split(line)[2:]
        release, namespace, values, positional = None, "default", {}, []
        i = 0
        while i < len(words):
            word = words[i]
            if word in ("-n", "--namespace"):
                namespace, i = words[i + 1], i + 2
                continue
            if word in ("--set", "--set-string", "-f", "--values"):
                if word in ("-f", "--values"):
                    merge(values, yaml.safe_load((ROOT / words[i + 1]).read_text()))
                else:
                    for assignment in words[i + 1].split(","):
                        key, _, value = assignment.partition("=")
                        parsed = value if word == "--set-string" else yaml.safe_load(value)
                        merge(values, functools.reduce(lambda acc, k: {k: acc}, reversed(key.split(".")), parsed))
                i += 2
                continue
            if not word.startswith("-"):
                positional.append(word)
            i += 1
        release = positional[0]
        installs.append((line, release, namespace, values))
    return installs


def merge(into, other):
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def validate_examples():
    """The README's helm install commands render, and deploy/istio names what they install."""
    installs = readme_installs()
    renderings = []
    for line, release, namespace, values in installs:
        try:
            renderings.append(Rendering(f"README `{line}`", values, release, namespace))
        except helm.HelmError as e:
            check(False, f"README `{line}` does not render: {e}")
    check(any(r.value("topology") == "sidecar" for r in renderings), "the README shows a helm install for topology sidecar")
    istio_renders = [r for r in renderings if r.value("istio.enabled")]
    check(istio_renders, "the README shows a helm install with istio.enabled")
    logout_renders = [r for r in renderings if r.value("backchannelLogout.enabled")]
    check(logout_renders, "the README shows a helm install with backchannelLogout.enabled")
    for r in logout_renders:
        deployment, service = r.kinds("Deployment")[0], r.kinds("Service")[0]
        authz = next(c for c in pod_containers(deployment) if c["name"] == "authz-sidecar")
        validate_logout(r, authz, container_env(r.objects, authz), deployment, service, r.kinds("NetworkPolicy"))
    mesh = yaml.safe_load((DEPLOY / "istio/mesh-config.yaml").read_text())
    provider = mesh["spec"]["meshConfig"]["extensionProviders"][0]
    grpc = provider["envoyExtAuthzGrpc"]
    policy = yaml.safe_load((DEPLOY / "istio/authorization-policy.yaml").read_text())
    snippets = [yaml.safe_load(block)["extensionProviders"][0] for block in
                re.findall(r"```yaml\n(extensionProviders:.*?)```", (ROOT / "README.md").read_text(), re.S)]
    for rendering in istio_renders:
        service = rendering.kinds("Service")[0]
        host = f"{service['metadata']['name']}.{rendering.namespace}.svc.cluster.local"
        check(grpc["service"] == host and grpc["port"] == service["spec"]["ports"][0]["port"],
              f"deploy/istio/mesh-config.yaml names {grpc['service']}:{grpc['port']}, but the README's "
              f"`helm install {rendering.release}` renders Service {host}:{service['spec']['ports'][0]['port']}")
        check(notes_provider(rendering.notes) == provider,
              "deploy/istio/mesh-config.yaml's provider is the one NOTES.txt prints for the README's install")
        check(snippets and all(s == provider for s in snippets),
              "the README's extensionProviders snippet is the one NOTES.txt prints for the README's install")
        rendered_policy = rendering.kinds("AuthorizationPolicy")[0]["spec"]
        check(policy["spec"]["provider"] == rendered_policy["provider"] and policy["spec"]["action"] == "CUSTOM",
              "deploy/istio/authorization-policy.yaml uses the provider the chart's policy names")
    # Whatever the README installs, the example's host is a Service one of its installs renders.
    hosts = {f"{s['metadata']['name']}.{r.namespace}.svc.cluster.local" for r in renderings for s in r.kinds("Service")}
    check(grpc["service"] in hosts, f"deploy/istio/mesh-config.yaml's host {grpc['service']} is a Service the "
                                    f"README's helm install renders ({sorted(hosts)})")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecar-bin", default=str(ROOT / "target/debug/authz-sidecar"))
    args = parser.parse_args()
    venv_bin = Path(sys.executable).parent
    workdir = Path(tempfile.mkdtemp(prefix="authz-validate-"))

    sources = build_sources(venv_bin)
    validate_schemas(venv_bin, sources, workdir)
    validate_rules(sources, workdir)
    validate_env(sources, binary_env_vars(args.sidecar_bin))
    validate_pods(sources, venv_bin, workdir)
    validate_chart(RENDERINGS)
    validate_overlays(sources)
    validate_refusals()
    validate_logout_notes()
    validate_examples()
    validate_metrics(sources, scrape_running_binary(args.sidecar_bin, workdir))
    validate_copies()
    print(f"deploy validation: {passed} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
