"""docker-compose.yml with real containers: nginx → 2 gateways → worker → 2 expert servers.

From a clean state `up -d`; the official `openai` client streams a chat completion through the
load balancer; the worker and the expert servers share one /dev/shm and the worker uses it
for expert-numa1 (expert-numa0 is made gRPC-only by numa0-remote.yml, as on another host); a killed gateway does not
fail requests; an expert server killed mid-stream ends that request with a clear error, nothing
hangs, and after `start` it serves again with no worker restart; the worker cut off from an
expert server (`docker network disconnect`) gets a clear error within a bounded time and
recovers on reconnect; `down` leaves nothing behind.

Needs the images of deploy/build.sh (KT_IMAGE, KT_LB_IMAGE). Tests run in file order on one
compose project with a unique name; it is always taken down at the end.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[3]
PROJECT = f"kte2e{os.getpid()}"
# Bounds the failure tests hold the system to (seconds).
ERROR_WITHIN = float(os.environ.get("KT_E2E_ERROR_WITHIN", "30"))
RECOVER_WITHIN = float(os.environ.get("KT_E2E_RECOVER_WITHIN", "90"))
TIMINGS = {}


def compose_cmd():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    def __init__(self):
        self.cmd = compose_cmd() + ["-f", str(ROOT / "docker-compose.yml"),
                                    "-f", str(Path(__file__).parent / "numa0-remote.yml"),
                                    "-p", PROJECT]
        self.port = free_port()
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT,
                    "KT_HTTP_BIND": "127.0.0.1", "KT_HTTP_PORT": str(self.port),
                    # A stalled expert server fails the requests that wait on it after this
                    # many seconds (the worker's setting, passed through by compose).
                    "KT_WORKER_EXPERT_TIMEOUT": os.environ.get("KT_WORKER_EXPERT_TIMEOUT", "10")}
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, *args, check=True, timeout=600):
        r = subprocess.run(self.cmd + list(args), env=self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        if check and r.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def ids(self, service):
        return self.run("ps", "-q", service).stdout.split()

    def logs(self):
        return self.run("logs", "--no-color", "--tail", "60", check=False).stdout

    def client(self, timeout=60.0):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="kt-e2e", max_retries=0,
                             timeout=timeout)


def docker(*args, check=True):
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout.strip()


def leftovers():
    """Containers, networks and volumes of the project that still exist."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": docker("ps", "-aq", "--filter", label).split(),
        "networks": docker("network", "ls", "-q", "--filter", label).split(),
        "volumes": docker("volume", "ls", "-q", "--filter", label).split(),
    }


def state(cid):
    return json.loads(docker("inspect", "--format", "{{json .State}}", cid))


def wait_healthy(c, service, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = c.ids(service)
        if ids and all(state(i).get("Health", {}).get("Status") == "healthy" for i in ids):
            return
        time.sleep(1)
    raise TimeoutError(f"{service} not healthy within {timeout} s\n{c.logs()}")


def chat(c, text="Hello", max_tokens=16, timeout=60.0):
    """A streamed chat completion through the load balancer: (chunks with text, finish)."""
    client = c.client(timeout)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0.8, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish


def serves(c):
    try:
        pieces, finish = chat(c, timeout=20)
        return bool(pieces) and finish in ("stop", "length")
    except Exception:
        return False


def wait_serving(c, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if serves(c):
            return time.monotonic() - t0
        time.sleep(1)
    raise TimeoutError(f"not serving again within {timeout} s\n{c.logs()}")


@pytest.fixture(scope="module")
def cluster():
    c = Compose()
    for image in (os.environ.get("KT_IMAGE", "kt:latest"), os.environ.get("KT_LB_IMAGE", "kt-lb:latest")):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode:
            pytest.fail(f"image {image} is missing: run deploy/build.sh first")
    assert leftovers() == {"containers": [], "networks": [], "volumes": []}, "not a clean state"
    try:
        t0 = time.monotonic()
        c.run("up", "-d")
        TIMINGS["up -d"] = time.monotonic() - t0
        TIMINGS["first answer after up"] = wait_serving(c, 120)
        yield c
    finally:
        try:
            print(c.logs())
        finally:
            c.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False)
            print("timings (s):", json.dumps({k: round(v, 2) for k, v in TIMINGS.items()}))


def test_streamed_chat_through_the_load_balancer(cluster):
    pieces, finish = chat(cluster, "Tell me about the sea.", max_tokens=24)
    assert len(pieces) >= 2, pieces
    assert finish in ("stop", "length")
    with urllib.request.urlopen(cluster.url + "/health", timeout=10) as r:
        assert r.status == 200
    # The web UI comes through the load balancer too.
    with urllib.request.urlopen(cluster.url + "/", timeout=10) as r:
        assert b'id="prompt"' in r.read()


def test_two_gateways_behind_the_balancer(cluster):
    assert len(cluster.ids("gateway")) == 2
    for service in ("gateway", "worker", "expert-numa0", "expert-numa1", "lb"):
        for cid in cluster.ids(service):
            assert state(cid)["Running"], service
            user = docker("inspect", "--format", "{{.Config.User}}", cid)
            assert user not in ("", "0", "root"), (service, user)


def test_worker_and_experts_share_dev_shm(cluster):
    worker = cluster.ids("worker")[0]
    experts = cluster.ids("expert-numa0") + cluster.ids("expert-numa1")
    probe = f"kt-e2e-{PROJECT}"
    docker("exec", experts[0], "bash", "-c", f"echo shared > /dev/shm/{probe}")
    try:
        facts = set()
        for cid in [worker] + experts:
            out = docker("exec", cid, "bash", "-c",
                         f"stat -c %d /dev/shm; cat /proc/sys/kernel/random/boot_id; cat /dev/shm/{probe}")
            facts.add(out)
        # Same device (the same tmpfs), same boot id, the same file: what the shared-memory
        # transport checks before it uses shared memory.
        assert len(facts) == 1 and facts.pop().endswith("shared"), facts
    finally:
        docker("exec", experts[0], "rm", "-f", f"/dev/shm/{probe}", check=False)
    # And the worker does use it for expert-numa1 (numa0 is gRPC-only in this test, see
    # numa0-remote.yml).
    log = cluster.run("logs", "--no-color", "worker").stdout
    links = dict(re.findall(r"connected to expert server .*?name=(\w+) transport=Some\((\w+)\)", log))
    assert links == {"numa0": "Grpc", "numa1": "Shm"}, log[-2000:]


def test_a_killed_gateway_does_not_fail_requests(cluster):
    victim = cluster.ids("gateway")[-1]
    docker("kill", victim)
    t0 = time.monotonic()
    for i in range(8):
        pieces, finish = chat(cluster, f"Request {i}", max_tokens=8, timeout=30)
        assert pieces and finish in ("stop", "length"), i
    TIMINGS["8 requests with one gateway killed"] = time.monotonic() - t0
    cluster.run("start", "gateway")
    wait_healthy(cluster, "gateway")


def _stream_in_thread(cluster, outcome, max_tokens):
    def run():
        t0 = time.monotonic()
        try:
            client = cluster.client(timeout=ERROR_WITHIN + 30)
            model = client.models.list().data[0].id
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Go"}],  # short: a 128-token context
                max_tokens=max_tokens, temperature=0.8, stream=True)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        outcome.setdefault("first", time.monotonic())
                        outcome["chunks"] = outcome.get("chunks", 0) + 1
                    if choice.finish_reason:
                        outcome["finish"] = choice.finish_reason
            outcome["result"] = "completed"
        except openai.APIError as e:
            outcome["result"] = "api_error"
            outcome["error"] = f"{type(e).__name__}: {e}"
        except Exception as e:  # a transport error is not a clear error
            outcome["result"] = "other"
            outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["end"] = time.monotonic()
        outcome["elapsed"] = outcome["end"] - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _throttle(cid, cpus=None):
    """Limits a container to `cpus` CPUs; None gives it every CPU of the host again
    (`docker update` cannot remove a --cpus limit)."""
    docker("update", "--cpus", str(cpus or os.cpu_count()), cid)


def test_expert_killed_mid_stream(cluster):
    worker = cluster.ids("worker")[0]
    worker_started = state(worker)["StartedAt"]
    victim = cluster.ids("expert-numa1")[0]
    # Slow the expert server down so the stream is still running when it is killed.
    _throttle(victim, 0.01)
    outcome = {}
    t = _stream_in_thread(cluster, outcome, max_tokens=64)
    deadline = time.monotonic() + 60
    while "first" not in outcome and "end" not in outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "first" in outcome and "end" not in outcome, f"no stream to interrupt: {outcome}"
    killed = time.monotonic()
    docker("kill", victim)
    t.join(ERROR_WITHIN + 40)
    assert not t.is_alive(), "the request hangs after the expert server was killed"
    TIMINGS["error after expert kill"] = outcome["end"] - killed
    assert outcome["result"] == "api_error", outcome
    assert outcome["end"] - killed <= ERROR_WITHIN, outcome
    print("expert killed mid-stream:", outcome)
    # Back with `start`, serving again, and the worker was never restarted.
    _throttle(victim)
    cluster.run("start", "expert-numa1")
    wait_healthy(cluster, "expert-numa1")
    TIMINGS["serving again after expert start"] = wait_serving(cluster, RECOVER_WITHIN)
    assert state(worker)["StartedAt"] == worker_started
    assert docker("inspect", "--format", "{{.RestartCount}}", worker) == "0"


def test_worker_cut_off_from_an_expert(cluster):
    worker = cluster.ids("worker")[0]
    worker_started = state(worker)["StartedAt"]
    victim = cluster.ids("expert-numa0")[0]
    network = f"{PROJECT}_back"
    docker("network", "disconnect", network, victim)
    try:
        t0 = time.monotonic()
        outcome = {}
        t = _stream_in_thread(cluster, outcome, max_tokens=16)
        t.join(ERROR_WITHIN + 40)
        assert not t.is_alive(), "the request hangs while the expert server is cut off"
        TIMINGS["error while cut off"] = outcome["end"] - t0
        assert outcome["result"] == "api_error", outcome
        assert outcome["end"] - t0 <= ERROR_WITHIN, outcome
        print("worker cut off from an expert server:", outcome)
    finally:
        docker("network", "connect", "--alias", "expert-numa0", network, victim)
    TIMINGS["serving again after reconnect"] = wait_serving(cluster, RECOVER_WITHIN)
    assert state(worker)["StartedAt"] == worker_started


def test_down_leaves_nothing(cluster):
    t0 = time.monotonic()
    cluster.run("down", "-v", "--remove-orphans", "--timeout", "10")
    TIMINGS["down"] = time.monotonic() - t0
    assert leftovers() == {"containers": [], "networks": [], "volumes": []}
    with pytest.raises(OSError):
        urllib.request.urlopen(cluster.url + "/health", timeout=3)
