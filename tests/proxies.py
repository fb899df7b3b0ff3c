"""A forwarding HTTP proxy on 127.0.0.1 in front of a real `mlflow server`, for tests that
need to see or shape the traffic: count the metric points of log-batch requests, or answer
a request only after the client gave up."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class Proxy:
    """``Proxy(target_uri)``: ``uri`` forwards to the target; ``points`` counts the metric
    points of every log-batch request by run id; ``delay[path_suffix]`` seconds are waited
    after the target answered a request whose path ends with it (the target did the work;
    the client hears of it late); ``lose[path_suffix]`` answers are replaced by a 503 (the
    target did the work; the client hears it failed)."""

    def __init__(self, target_uri: str) -> None:
        parts = urlsplit(target_uri)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.points: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.lose: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy._count(self.path, body)
                conn = http.client.HTTPConnection(*proxy.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                conn.close()
                for suffix, seconds in list(proxy.delay.items()):
                    if self.path.split("?")[0].endswith(suffix):
                        time.sleep(seconds)
                with proxy.lock:
                    path = self.path.split("?")[0]
                    lost = [s for s, n in proxy.lose.items() if n > 0 and path.endswith(s)]
                    for suffix in lost:
                        proxy.lose[suffix] -= 1
                if lost:
                    self.send_error(503, "answer lost by the test proxy")
                    return
                try:
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up meanwhile
                    pass

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _count(self, path: str, body: bytes) -> None:
        if not path.split("?")[0].endswith("/runs/log-batch") or not body:
            return
        data = json.loads(body)
        with self.lock:
            run_id = data.get("run_id", "")
            self.points[run_id] = self.points.get(run_id, 0) + len(data.get("metrics", []))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False
