"""Fixtures of the gateway's end-to-end tests: processes started here and stopped at the end.

Two ways to serve the API under test:
* kt-gateway ($KT_E2E_GATEWAY_BIN), one process per configuration, in front of a worker:
  $KT_E2E_WORKER (host:port of a running worker, e.g. the real kt-worker), else the simulated
  worker ($KT_E2E_SIM_BIN);
* `kt serve` ($KT_E2E_SERVE_BIN, the `kt` binary; tests/e2e/run-api-serve.sh): gateway, worker
  engine and experts in one process, one per configuration, each started with
  $KT_E2E_SERVE_ARGS (e.g. `--model FILE --model-name qwen3moe-tiny`) plus the configuration's
  gateway flags (API keys, limits, chat template), which `kt serve` takes under the same names.

Nothing here reaches the network beyond 127.0.0.1.
"""

import os
import pathlib
import shlex
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = "qwen3moe-tiny"
TOOL_TEMPLATE = ROOT / "tests/fixtures/chat-templates/templates/Qwen-Qwen3-0.6B.jinja"


class Proc:
    """A child process that prints `listening on ADDR` once it serves."""

    def __init__(self, argv, env=None):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        deadline = time.time() + 30
        line = ""
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if line.startswith("listening on "):
                self.addr = line.split()[-1]
                return
            if self.p.poll() is not None:
                break
        err = self.p.stderr.read() if self.p.poll() is not None else ""
        self.stop()
        raise RuntimeError(f"{argv[0]} did not start: {line!r} {err}")

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


def _bin(var):
    path = os.environ.get(var)
    if not path or not os.path.exists(path):
        pytest.exit(f"${var} must name a built binary (use tests/e2e/run-api.sh)", returncode=2)
    return path


def _serve_mode():
    return bool(os.environ.get("KT_E2E_SERVE_BIN"))


@pytest.fixture(scope="session")
def worker():
    """(address, is_simulated); no address under `kt serve`, which holds its own worker."""
    if _serve_mode():
        yield None, False
        return
    given = os.environ.get("KT_E2E_WORKER")
    if given:
        yield given, False
        return
    p = Proc([_bin("KT_E2E_SIM_BIN"), "--listen", "127.0.0.1:0", "--max-context", "2048"])
    yield p.addr, True
    p.stop()


def start_gateway(worker_addr, *extra):
    """A gateway with the gateway flags `extra`: kt-gateway in front of `worker_addr`, or a
    `kt serve` process of its own."""
    if _serve_mode():
        return Proc([_bin("KT_E2E_SERVE_BIN"), "serve", "--listen", "127.0.0.1:0",
                     *shlex.split(os.environ.get("KT_E2E_SERVE_ARGS", "")), *extra],
                    env={"RUST_LOG": "warn"})
    return Proc([_bin("KT_E2E_GATEWAY_BIN"), "--worker", worker_addr, "--listen", "127.0.0.1:0",
                 "--health-interval-ms", "200", *extra], env={"RUST_LOG": "warn"})


@pytest.fixture(scope="session")
def gateway(worker):
    p = start_gateway(worker[0])
    yield p.addr
    p.stop()


@pytest.fixture(scope="session")
def tool_gateway(worker):
    p = start_gateway(worker[0], "--chat-template", str(TOOL_TEMPLATE))
    yield p.addr
    p.stop()


@pytest.fixture(scope="session")
def keyed_gateway(worker):
    p = start_gateway(worker[0], "--api-key", "secret-1,secret-2")
    yield p.addr
    p.stop()


@pytest.fixture(scope="session")
def tiny_gateway(worker):
    """One generation at a time, one waiting, a short queue timeout, a small body limit."""
    p = start_gateway(worker[0], "--max-running", "1", "--max-queue", "1", "--queue-timeout-s", "0.5",
                      "--max-body-bytes", "65536")
    yield p.addr
    p.stop()


@pytest.fixture
def simulated(worker):
    if not worker[1]:
        pytest.skip("needs the simulated worker's scripted replies (a real model's output is "
                    "not a tool call / JSON / a seconds-long generation on demand)")
