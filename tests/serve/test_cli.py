"""The `dcml serve` command itself, in its own process: token from the environment, a free port, SIGTERM stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

import dcml

from .conftest import TOKEN

# The child registers the tests' tiny backbone before running the CLI, as the test process has.
_CHILD = "import sys; sys.path.insert(0, sys.argv.pop(1)); import training.conftest; from dcml.cli import main; sys.exit(main(sys.argv[1:]))"


def test_the_serve_command_answers_over_http_and_stops_on_sigterm(built_index):
    tests = Path(__file__).resolve().parents[1]
    src = Path(dcml.__file__).resolve().parents[1]
    env = {**os.environ, "DCML_SERVE_TOKEN": TOKEN, "PYTHONPATH": os.pathsep.join([str(src), str(tests)])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tests), "serve", str(built_index), "--port", "0"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    watchdog = threading.Timer(120, child.kill)  # whatever happens below, the child does not outlive the test
    watchdog.start()
    try:
        banner = child.stderr.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", banner)
        assert found, banner
        url = found.group(1)
        assert "token required" in banner and "writes off" in banner
        assert httpx.get(f"{url}/health", timeout=30).status_code == 401
        health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert health.status_code == 200 and health.json()["items"] == 24
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 143
        assert "stopped by SIGTERM" in child.stderr.read()
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
