"""Fixtures of the web UI browser test: a kt cluster on 127.0.0.1 (two kt-expert servers, a
kt-worker, a kt-gateway with an API key, all configured through their environment variables,
on the embedded default model) and headless Chromium from Debian driven by Selenium.

Environment:
  KT_BIN_DIR            folder with kt-expert, kt-worker, kt-gateway
                        (default $CARGO_TARGET_DIR/release, else target/release)
  KT_E2E_GATEWAY_URL    use this running gateway instead of starting processes (then the test
                        that stops the worker is skipped); KT_E2E_API_KEY is its key, if any
  KT_E2E_CHROMIUM, KT_E2E_CHROMEDRIVER   browser and driver (default /usr/bin/chromium and
                        /usr/bin/chromedriver: given explicitly, so Selenium Manager never runs)
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "tests/fixtures/models/qwen3moe/gguf/q8_0.gguf"
PLAN = ROOT / "deploy/plans/qwen3moe-tiny-2numa.yaml"
API_KEY = "kt-e2e-browser-key"


def bin_dir() -> Path:
    if os.environ.get("KT_BIN_DIR"):
        return Path(os.environ["KT_BIN_DIR"])
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, key=None, timeout=5.0):
    """(status, body) of a GET; status 0 when nothing answers."""
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def wait_for(what, check, timeout, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready within {timeout} s")


class Cluster:
    """The processes behind the page; `url` is the gateway's base URL."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs = {}
        self.url = None
        self.key = API_KEY
        self.external = False

    def start(self, name, exe, env):
        path = bin_dir() / exe
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: build it (cargo build --release -p ...)")
        log = open(self.tmp / f"{name}.log", "wb")
        full = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1", **env}
        self.procs[name] = subprocess.Popen([str(path)], env=full, stdout=log, stderr=log)

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.kill()
            p.wait(timeout=10)

    def logs(self):
        out = []
        for f in sorted(self.tmp.glob("*.log")):
            out.append(f"---- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kt-browser"))
    if os.environ.get("KT_E2E_GATEWAY_URL"):
        c.url = os.environ["KT_E2E_GATEWAY_URL"].rstrip("/")
        c.key = os.environ.get("KT_E2E_API_KEY", "")
        c.external = True
        yield c
        return
    ports = {n: free_port() for n in ("numa0", "numa1", "worker", "gateway")}
    try:
        for n in ("numa0", "numa1"):
            c.start(n, "kt-expert", {
                "KT_EXPERT_MODEL": str(MODEL),
                "KT_EXPERT_PLAN": str(PLAN),
                "KT_EXPERT_NAME": n,
                "KT_EXPERT_LISTEN": f"127.0.0.1:{ports[n]}",
                "KT_EXPERT_THREADS": "1",
            })
        c.start("worker", "kt-worker", {
            "KT_WORKER_MODEL": str(MODEL),
            "KT_WORKER_PLAN": str(PLAN),
            "KT_WORKER_DEVICE": "cpu",
            "KT_WORKER_EXPERT": f"numa0=127.0.0.1:{ports['numa0']},numa1=127.0.0.1:{ports['numa1']}",
            "KT_WORKER_LISTEN": f"127.0.0.1:{ports['worker']}",
        })
        c.start("gateway", "kt-gateway", {
            "KT_GATEWAY_WORKERS": f"127.0.0.1:{ports['worker']}",
            "KT_GATEWAY_LISTEN": f"127.0.0.1:{ports['gateway']}",
            "KT_GATEWAY_MODEL": str(MODEL),
            "KT_GATEWAY_API_KEYS": API_KEY,
        })
        c.url = f"http://127.0.0.1:{ports['gateway']}"

        def ready():
            status, body = http(c.url + "/v1/models", c.key)
            return status == 200 and json.loads(body).get("data")

        wait_for("the gateway's /v1/models", ready, 90, list(c.procs.items()))
        # The worker waits for its expert servers (--expert-wait); the tests need it serving.
        wait_for("a healthy worker behind the gateway (/ready)",
                 lambda: http(c.url + "/ready")[0] == 200, 150, list(c.procs.items()))
        yield c
    except Exception:
        print(c.logs())
        raise
    finally:
        for name in list(c.procs):
            c.stop(name)


@pytest.fixture(scope="session")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("KT_E2E_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--window-size=1280,900",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    service = Service(executable_path=os.environ.get("KT_E2E_CHROMEDRIVER", "/usr/bin/chromedriver"))
    d = webdriver.Chrome(service=service, options=opts)
    d.set_script_timeout(30)
    yield d
    d.quit()
