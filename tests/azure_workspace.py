"""Stand-in Azure ML workspaces on 127.0.0.1, in front of a real `mlflow server`.

``SimulatedWorkspace``: plain HTTP that keeps Azure ML's limits (SPEC section 19), used
with ``TRAINKIT_STORE_FLAVOR=azureml`` in the main venv. ``FakeWorkspace``: HTTPS with
the URI shape and sign-in azureml-mlflow needs (the azure extra), described below.


azureml-mlflow talks to ``https://<host>/mlflow/v2.0/subscriptions/.../workspaces/<ws>``
followed by MLflow's own REST paths. This proxy strips the workspace prefix, checks the
bearer token, and forwards the rest to a real MLflow server, so the SDK's Azure path
(scheme registration, job-token sign-in, azureml-mlflow's store) runs against real MLflow
without leaving loopback. Needs `cryptography` (an azureml-mlflow dependency).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

WORKSPACE_PATH = (
    "/subscriptions/0000aaaa-0000-0000-0000-000000000000/resourceGroups/rg-ner"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws-ner"
)
_PREFIX = re.compile(r"^/mlflow/v[0-9.]+" + re.escape(WORKSPACE_PATH))


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "workspace.pem", directory / "workspace.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FakeWorkspace:
    """HTTPS on 127.0.0.1 that accepts one bearer token and forwards to ``upstream``."""

    def __init__(self, upstream: str, token: str, directory: Path) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.token = token
        self.cert, key = self_signed_certificate(directory)
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        workspace = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                authorised = self.headers.get("Authorization") == f"Bearer {workspace.token}"
                match = _PREFIX.match(self.path)
                workspace.requests.append((self.command, self.path, authorised))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not authorised or match is None:
                    self.send_response(401 if not authorised else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(*workspace.upstream, timeout=30)
                try:
                    headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                    conn.request(self.command, self.path[match.end() :], body, headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                self.send_header("Content-Type", response.getheader("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        """The workspace's MLflow tracking URI, in the shape Azure ML hands out."""
        port = self._server.server_address[1]
        return f"azureml://127.0.0.1:{port}/mlflow/v1.0{WORKSPACE_PATH}"

    def __enter__(self) -> FakeWorkspace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# A simulated workspace: Azure ML's limits on a plain-HTTP proxy ------------------------

AZURE_PARAMS_PER_RUN = 200
AZURE_METRICS_PER_REQUEST = 250
AZURE_PAGE_LIMIT = 1000  # a search asking for this many results or more is refused
_ARCHIVED = "~archived~"


def _azure_refusal(field: str, limit: int, size: int) -> dict[str, str]:
    """The body Azure ML answers an over-limit request with (mlflow#11462, #35685)."""
    return {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": (
            "Response: {'Error': {'Code': 'ValidationError', 'Message': 'A field of the "
            f"entity is over the size limit. FieldName={field}, Limit={limit}, Size={size}.'}}}}"
        ),
    }


class SimulatedWorkspace:
    """A plain-HTTP proxy on 127.0.0.1 in front of a real `mlflow server` that behaves as
    Azure ML's tracking service where it is stricter than MLflow (SPEC section 19).

    - at most 200 params per run (log-parameter and log-batch, checked under one lock);
    - at most 250 metric values per log-batch request;
    - search pages (runs, experiments) of 1000 results or more refused;
    - experiments are only archived: a deleted experiment gets out of the way of its
      name (renamed aside, then deleted), so that a new one can take it;
    - experiment names containing ``/`` cannot be read back by name nor listed.

    Every refused request is recorded in ``violations``; ``calls`` counts requests per
    path. Clients use it with ``TRAINKIT_STORE_FLAVOR=azureml``, in the main venv.
    """

    def __init__(
        self, upstream: str, *, params_per_run: int = AZURE_PARAMS_PER_RUN, limits: bool = True
    ) -> None:
        """``limits=False``: forward everything (a proxy for delays, outages and counts)."""
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.params_per_run = params_per_run
        self.limits = limits
        self.violations: list[str] = []
        self.calls: dict[str, int] = {}
        # Texts that all appear in a request body -> seconds to hold it; ``held`` is set
        # when one is being held.
        self.delay: dict[tuple[str, ...], float] = {}
        self.held = threading.Event()
        self.down = False  # answer 503 to everything (an outage)
        self._params_lock = threading.Lock()
        workspace = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _answer(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                workspace.calls[path] = workspace.calls.get(path, 0) + 1
                if workspace.down:
                    self._answer(503, b"", "text/plain")
                    return
                for texts, seconds in list(workspace.delay.items()):
                    if all(text.encode() in body for text in texts):
                        workspace.held.set()
                        time.sleep(seconds)
                if workspace.limits:
                    status, data, content_type = workspace._serve(
                        self.command, self.path, body, self.headers
                    )
                else:
                    status, data, content_type = workspace._upstream(
                        self.command, self.path, body or None, self.headers
                    )
                self._answer(status, data, content_type)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SimulatedWorkspace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # Upstream ------------------------------------------------------------------------

    def _upstream(
        self, method: str, path: str, body: bytes | None, headers: Any = None
    ) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            sent = {"Content-Type": "application/json"}
            if headers is not None:
                for name in ("Content-Type", "Authorization"):
                    if headers.get(name):
                        sent[name] = headers[name]
            conn.request(method, path, body, sent)
            response = conn.getresponse()
            return (
                response.status,
                response.read(),
                response.getheader("Content-Type", "application/json"),
            )
        finally:
            conn.close()

    def _json(self, method: str, path: str, payload: Any) -> Any:
        status, data, _ = self._upstream(method, path, json.dumps(payload).encode())
        return json.loads(data) if status == 200 else None

    def _refuse(self, what: str, body: dict[str, str]) -> tuple[int, bytes, str]:
        self.violations.append(what)
        return 400, json.dumps(body).encode(), "application/json"

    # The rules -----------------------------------------------------------------------

    def _serve(
        self, method: str, raw_path: str, body: bytes, headers: Any
    ) -> tuple[int, bytes, str]:
        path = urlsplit(raw_path).path
        query = urlsplit(raw_path).query
        api = path.split("/mlflow/", 1)[1] if "/mlflow/" in path else ""
        payload: dict[str, Any] = {}
        if body and "json" in (headers.get("Content-Type") or "application/json"):
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {}
        if api in ("runs/search", "experiments/search"):
            asked = payload.get("max_results")
            if asked is None and query:
                found = re.search(r"max_results=(\d+)", query)
                asked = int(found.group(1)) if found else None
            if asked is None or int(asked) >= AZURE_PAGE_LIMIT:
                return self._refuse(
                    f"{api} asked for {asked} results",
                    {"error_code": "INVALID_PARAMETER_VALUE", "message": "max_results >= 1000"},
                )
        if api == "runs/log-batch":
            metrics = len(payload.get("metrics") or [])
            if metrics > AZURE_METRICS_PER_REQUEST:
                return self._refuse(
                    f"log-batch of {metrics} metric values",
                    _azure_refusal("MetricV2Dto.Value/Count", AZURE_METRICS_PER_REQUEST, metrics),
                )
        if api in ("runs/log-batch", "runs/log-parameter"):
            keys = (
                [p["key"] for p in payload.get("params") or []]
                if api == "runs/log-batch"
                else [payload.get("key")]
            )
            if keys:
                with self._params_lock:  # Azure counts atomically; so must the stand-in
                    return self._params(method, raw_path, body, headers, payload, keys)
        if api == "experiments/delete":
            return self._archive(method, raw_path, body, headers, payload)
        if api == "experiments/get-by-name":
            name = payload.get("experiment_name")
            if name is None and query:
                found = re.search(r"experiment_name=([^&]*)", query)
                name = unquote(found.group(1)) if found else None
            if name is not None and "/" in name:
                return (
                    404,
                    json.dumps(
                        {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "not found"}
                    ).encode(),
                    "application/json",
                )
        status, data, content_type = self._upstream(method, raw_path, body or None, headers)
        if api == "experiments/search" and status == 200:
            listed = json.loads(data)
            listed["experiments"] = [
                e for e in listed.get("experiments", []) if "/" not in e.get("name", "")
            ]
            data = json.dumps(listed).encode()
        return status, data, content_type

    def _params(
        self, method: str, raw_path: str, body: bytes, headers: Any, payload: Any, keys: list[str]
    ) -> tuple[int, bytes, str]:
        run_id = payload.get("run_id") or payload.get("run_uuid")
        run = self._json("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}", None)
        held = {p["key"] for p in (run or {}).get("run", {}).get("data", {}).get("params", [])}
        size = len(held | set(keys))
        if size > self.params_per_run:
            return self._refuse(
                f"run {run_id} would hold {size} params",
                _azure_refusal("Parameters", self.params_per_run, size),
            )
        return self._upstream(method, raw_path, body, headers)

    def _archive(
        self, method: str, raw_path: str, body: bytes, headers: Any, payload: Any
    ) -> tuple[int, bytes, str]:
        experiment_id = payload.get("experiment_id")
        found = self._json(
            "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", None
        )
        if found is not None:
            name = found["experiment"]["name"]
            self._json(
                "POST",
                "/api/2.0/mlflow/experiments/update",
                {"experiment_id": experiment_id, "new_name": f"{name}{_ARCHIVED}{experiment_id}"},
            )
        return self._upstream(method, raw_path, body, headers)
