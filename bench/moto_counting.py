"""A moto S3 server on 127.0.0.1 that counts the requests it serves and the bytes it sends.

moto's own WSGI application wrapped in a counting middleware, run as a separate process (so the reader
processes a bench or test measures do not share its GIL). `GET /__counts__` returns
{"requests": {METHOD: n}, "bytes_out": n, "get_bytes": n}; `POST /__counts__/reset` zeroes them.

Usage::

    from bench.moto_counting import CountingMoto
    with CountingMoto() as s3:                       # starts `python -m bench.moto_counting --port P`
        so = s3.storage_options                      # for StoreWriter / StoreReader (s3fs)
        url = s3.bucket_url("kv")                    # creates the bucket, returns s3://kv-.../store
        s3.reset(); ...; print(s3.counts())          # {"requests": {"GET": 12, "HEAD": 1}, ...}
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class _Counter:
    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests: dict[str, int] = {}
            self.bytes_out = self.get_bytes = 0

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "bytes_out": self.bytes_out, "get_bytes": self.get_bytes}

    def __call__(self, environ: dict, start_response: Any) -> Any:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/__counts__"):
            if path.endswith("/reset"):
                self.reset()
            body = json.dumps(self.snapshot()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if os.environ.get("MOTO_COUNTING_LOG"):
            print(method, path, environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE", ""), flush=True)
        out = list(self.app(environ, start_response))
        n = sum(len(b) for b in out)
        with self.lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            self.bytes_out += n
            if method == "GET":
                self.get_bytes += n
        return out


def serve(port: int) -> None:
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _Counter(DomainDispatcherApplication(create_backend_app))
    srv = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start())
    srv.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingMoto:
    """Starts the counting server as a child process; stops it (by its pid) on exit."""

    def __init__(self, log_path: str | None = None) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": "x", "secret": "x", "client_kwargs": {"region_name": "us-east-1"}}

    def __enter__(self) -> CountingMoto:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.moto_counting", "--port", str(self.port)],
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                self.counts()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the counting moto server did not start (rc={self.proc.poll()}); is "
                                       "moto[server] installed? (pip install 'moto[server]')") from None
                time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def bucket_url(self, prefix: str = "kv") -> str:
        import boto3

        bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        return f"s3://{bucket}/store"

    def counts(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/__counts__", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/__counts__/reset", method="POST"),
                               timeout=5).read()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    serve(ap.parse_args().port)
