"""A stand-in Azure ML workspace on 127.0.0.1: HTTPS in front of a real `mlflow server`.

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
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
