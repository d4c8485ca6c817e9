"""A TensorBoard server on a loopback port, queried through its HTTP API as the browser does."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard_server(logdir: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start `tensorboard --logdir logdir` on 127.0.0.1; yield its base URL once it answers and
    has loaded the runs; stop it."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            f"--logdir={logdir}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--reload_interval=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if json.loads(response.read()):
                        break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "tensorboard did not come up"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def post(url: str, route: str, request: dict) -> dict:
    """POST a JSON request to a plugin route, as TensorBoard's frontend does."""
    data = json.dumps(request).encode()
    headers = {"Content-Type": "application/json", "X-XSRF-Protected": "1"}
    with urllib.request.urlopen(
        urllib.request.Request(f"{url}{route}", data=data, headers=headers), timeout=30
    ) as response:
        return json.loads(response.read())
