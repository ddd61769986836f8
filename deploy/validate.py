"""Validates everything under deploy/ against real tools and the real binary.

- `kubectl kustomize` builds every overlay; the Helm chart renders with default and custom values;
- every built-in Kubernetes object validates (strict) against the Kubernetes schemas;
- PrometheusRules pass `promtool check rules`;
- every env var the manifests set is one the binary knows, and the chart's values list all of them;
- every `ext_authz_*` metric in the dashboard and the alerts is exported by a running binary;
- copies that must not drift (dashboard, rules, the sidecar overlay's ext_authz filter) match.

    .venv/bin/python deploy/validate.py --sidecar-bin target/debug/authz-sidecar
"""

import argparse
import json
import os
import re
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
    chart = helm.Chart.load(str(CHART))
    custom = yaml.safe_load((CHART / "ci/custom-values.yaml").read_text())
    for label, values in (("helm/default", None), ("helm/custom", custom)):
        rendered = chart.render(values, name="authz", namespace="authz", is_install=True)
        sources.append((label, [doc for text in rendered.values() for doc in documents(text)]))
    lint = helm.lint(str(CHART), strict=True)
    check(not lint["errors"] and all(m["severity"] < 2 for m in lint["messages"]), f"helm lint: {lint}")
    return sources


def validate_schemas(venv_bin, sources, workdir):
    files = []
    for label, objects in sources:
        for i, obj in enumerate(objects):
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRDs: checked below (rules by promtool), no upstream schema to use
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
    for label, objects in sources:
        for obj in objects:
            if obj["kind"] == "PrometheusRule":
                path = workdir / f"rules-{label.replace('/', '_')}.yaml"
                path.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}))
                out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
                check(out.returncode == 0, f"promtool {label}: {out.stdout}{out.stderr}")
            if obj["kind"] == "ServiceMonitor":
                endpoints = obj["spec"].get("endpoints", [])
                check(endpoints and all(e.get("port") == "metrics" for e in endpoints),
                      f"{label}: ServiceMonitor scrapes the `metrics` port")


def binary_env_vars(sidecar_bin):
    help_text = subprocess.run([sidecar_bin, "--help"], capture_output=True, text=True, check=True).stdout
    # --help wraps lines, sometimes between `[env:` and the name: join the words first.
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", " ".join(help_text.split())))


def validate_env(sources, known):
    for label, objects in sources:
        for obj in objects:
            names = set()
            settings_map = not any(s in obj["metadata"]["name"] for s in ("dashboard", "gateway-envoy"))
            if obj["kind"] == "ConfigMap" and settings_map:
                names |= set(obj.get("data", {}))
            if obj["kind"] == "Deployment":
                for container in obj["spec"]["template"]["spec"]["containers"]:
                    if container["name"] == "authz-sidecar":
                        names |= {e["name"] for e in container.get("env", [])}
            unknown = names - known
            check(not unknown, f"{label} {obj['kind']}/{obj['metadata']['name']}: unknown env vars {sorted(unknown)}")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    check(set(values["env"]) == known,
          f"chart values.env must list every setting: missing {sorted(known - set(values['env']))}, "
          f"extra {sorted(set(values['env']) - known)}")


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


def metric_names(text):
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bext_authz_[a-z_]+", text)}


def validate_metrics(sources, scrape):
    exported = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    exported = {re.sub(r"_(bucket|sum|count)$", "", m) for m in exported}
    dashboard = (DEPLOY / "grafana/authz-sidecar.json").read_text()
    json.loads(dashboard)
    used = metric_names(dashboard)
    for _, objects in sources:
        for obj in objects:
            if obj["kind"] == "PrometheusRule":
                used |= metric_names(json.dumps(obj["spec"]))
    check(len(used) >= 8, f"dashboard and rules use the sidecar's metrics ({sorted(used)})")
    missing = used - exported
    check(not missing, f"dashboard/rules name metrics the binary does not export: {sorted(missing)}")


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
    validate_metrics(sources, scrape_running_binary(args.sidecar_bin, workdir))
    validate_copies()
    print(f"deploy validation: {passed} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
