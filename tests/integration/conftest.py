"""Fixtures for cache_store integration tests: a moto S3 server on 127.0.0.1, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from kava_testing import free_port


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `moto_server -H 127.0.0.1 -p PORT`; yield its URL; stop it by PID (bounded wait)."""
    exe = Path(sys.executable).with_name("moto_server")
    exe_s = str(exe) if exe.exists() else shutil.which("moto_server")
    if exe_s is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe_s, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start (rc={proc.poll()}); log:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture()
def s3_store(moto_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the moto server -> (s3://bucket/store URL, storage_options)."""
    import boto3

    bucket = f"kv-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    so = {"endpoint_url": moto_endpoint, "key": "x", "secret": "x", "client_kwargs": {"region_name": "us-east-1"}}
    return f"s3://{bucket}/stores/kv", so
