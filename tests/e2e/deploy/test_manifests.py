"""Offline checks of deploy/k8s and docker-compose.yml: Kubernetes schemas (kubernetes-validate,
strict, with a broken copy that must fail), and the cross-references no schema sees: selectors
match pod labels, Service ports name container ports, StatefulSets have their headless
Services, addresses point at Services and ports that exist, expert server names are the
plan's, every environment variable set is one the binary reads (its --help), and compose
passes every variable of each binary through.

KT_BIN_DIR (default $CARGO_TARGET_DIR/release, else target/release) holds the binaries whose
--help is read; KT_E2E_REQUIRE_BINARIES=1 (CI) turns a missing binary into a failure.
"""

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy/k8s"
PLAN = ROOT / "deploy/plans/qwen3moe-tiny-2numa.yaml"
FIXTURE = ROOT / "tests/fixtures/models/qwen3moe/gguf/q8_0.gguf"
# Variables every container may set that no kt binary reads.
OUTSIDE = {"RUST_LOG", "NO_COLOR", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}


def bin_dir():
    if os.environ.get("KT_BIN_DIR"):
        return Path(os.environ["KT_BIN_DIR"])
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"


_help = {}


def env_of(binary):
    """The environment variables `binary --help` names (clap's `[env: NAME=...]`)."""
    if binary not in _help:
        exe = bin_dir() / binary
        if not exe.exists():
            if os.environ.get("KT_E2E_REQUIRE_BINARIES") == "1":
                pytest.fail(f"{exe} is missing")
            pytest.skip(f"{exe} is missing (build it to check its variables)")
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        _help[binary] = set(re.findall(r"\[env: ([A-Z0-9_]+)", out.stdout))
        assert _help[binary], f"{binary} --help names no variable"
    return _help[binary]


def docs():
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out.append(d)
    return out


def kind(k):
    return [d for d in docs() if d["kind"] == k]


def workloads():
    return kind("Deployment") + kind("StatefulSet")


def pod_labels(w):
    return w["spec"]["template"]["metadata"]["labels"]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def containers(w):
    return w["spec"]["template"]["spec"]["containers"]


def env_map(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# ---------------------------------------------------------------- schemas


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files


def test_schemas_strict(tmp_path):
    import kubernetes_validate

    checked = 0
    for d in docs():
        kubernetes_validate.validate(d, "1.33", strict=True)
        checked += 1
    assert checked >= 15
    # The validator does reject what is wrong: a misspelt field and a wrong type.
    bad = copy.deepcopy(kind("Deployment")[0])
    bad["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)
    bad = copy.deepcopy(kind("StatefulSet")[0])
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)


# ---------------------------------------------------------------- cross-references


def test_selectors_match_their_pods():
    for w in workloads():
        assert selects(w["spec"]["selector"]["matchLabels"], pod_labels(w)), w["metadata"]["name"]
    for s in kind("Service"):
        matched = [w for w in workloads() if selects(s["spec"]["selector"], pod_labels(w))]
        assert matched, f"Service {s['metadata']['name']} selects no pods"
        for w in matched:
            names = {p["name"] for c in containers(w) for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                assert p["targetPort"] in names, (s["metadata"]["name"], p)
    for pdb in kind("PodDisruptionBudget"):
        matched = [w for w in workloads()
                   if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))]
        assert len(matched) == 1, (pdb["metadata"]["name"], [w["metadata"]["name"] for w in matched])
    for hpa in kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads())


def test_statefulsets_have_headless_services():
    services = {s["metadata"]["name"]: s for s in kind("Service")}
    for sts in kind("StatefulSet"):
        svc = services.get(sts["spec"]["serviceName"])
        assert svc is not None, sts["metadata"]["name"]
        assert svc["spec"].get("clusterIP") == "None", svc["metadata"]["name"]
        assert selects(svc["spec"]["selector"], pod_labels(sts))


def test_volumes_and_their_sources_exist():
    config_maps = {c["metadata"]["name"] for c in kind("ConfigMap")}
    claims = {c["metadata"]["name"] for c in kind("PersistentVolumeClaim")}
    for w in workloads():
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
        for c in containers(w):
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, (w["metadata"]["name"], m)
        for v in vols.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def pod_dns(host):
    """`<sts>-<i>.<svc>.<ns>.svc.cluster.local` → (sts, i, svc, ns)."""
    m = re.fullmatch(r"([a-z0-9-]+)-(\d+)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
    assert m, host
    return m.group(1), int(m.group(2)), m.group(3), m.group(4)


def check_pod_address(addr):
    host, port = addr.rsplit(":", 1)
    sts_name, index, svc_name, ns = pod_dns(host)
    sts = next(s for s in kind("StatefulSet") if s["metadata"]["name"] == sts_name)
    assert sts["metadata"]["namespace"] == ns and sts["spec"]["serviceName"] == svc_name
    assert index < sts["spec"]["replicas"], addr
    svc = next(s for s in kind("Service") if s["metadata"]["name"] == svc_name)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, addr
    return sts


def plan_servers(text):
    return set(yaml.safe_load(text)["experts"]["servers"])


def test_addresses_and_server_names():
    plan = yaml.safe_load(kind("ConfigMap")[0]["data"]["plan.yaml"])
    # The ConfigMap carries the same plan as deploy/plans (the image's default model).
    assert plan == yaml.safe_load(PLAN.read_text())
    servers = set(plan["experts"]["servers"])
    gw = next(d for d in kind("Deployment") if d["metadata"]["name"] == "kt-gateway")
    for addr in env_map(containers(gw)[0])["KT_GATEWAY_WORKERS"].split(","):
        assert check_pod_address(addr)["metadata"]["name"] == "kt-worker"
    worker = next(s for s in kind("StatefulSet") if s["metadata"]["name"] == "kt-worker")
    named = {}
    for spec in env_map(containers(worker)[0])["KT_WORKER_EXPERT"].split(","):
        name, addr = spec.split("=", 1)
        sts = check_pod_address(addr)
        expert_env = env_map(containers(sts)[0])
        assert expert_env["KT_EXPERT_NAME"] == name, (name, sts["metadata"]["name"])
        named[name] = addr
    assert set(named) == servers
    # Every expert StatefulSet is one server of the plan.
    experts = [s for s in kind("StatefulSet") if containers(s)[0]["command"] == ["kt-expert"]]
    assert {env_map(containers(s)[0])["KT_EXPERT_NAME"] for s in experts} == servers


def test_expert_pods_are_guaranteed_with_whole_cpus():
    experts = [s for s in kind("StatefulSet") if containers(s)[0]["command"] == ["kt-expert"]]
    assert len(experts) == 2
    for s in experts:
        r = containers(s)[0]["resources"]
        assert r["requests"] == r["limits"], s["metadata"]["name"]
        assert float(r["requests"]["cpu"]).is_integer(), r
        assert "KT_EXPERT_NUMA" not in env_map(containers(s)[0])  # the kubelet pins


def test_worker_requests_a_gpu():
    worker = next(s for s in kind("StatefulSet") if s["metadata"]["name"] == "kt-worker")
    r = containers(worker)[0]["resources"]
    assert r["requests"]["nvidia.com/gpu"] == r["limits"]["nvidia.com/gpu"] == 1


def test_k8s_env_names_are_read_by_the_binaries():
    for w in workloads():
        for c in containers(w):
            binary = c["command"][0]
            names = set(env_map(c)) - OUTSIDE
            unknown = names - env_of(binary)
            assert not unknown, (w["metadata"]["name"], binary, unknown)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = c.get(probe, {}).get("exec", {}).get("command")
                if cmd:
                    assert cmd[:2] == ["kt", "healthcheck"], cmd
                    listen = {"kt-expert": "KT_EXPERT_LISTEN", "kt-worker": "KT_WORKER_LISTEN"}[binary]
                    assert listen in env_map(c), (binary, listen)


# ---------------------------------------------------------------- docker-compose.yml


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_env(service):
    out = {}
    for item in service.get("environment", []):
        name, _, value = item.partition("=")
        out[name] = value if "=" in item else None
    return out


def default(value):
    """`${X:-d}` → d."""
    m = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return m.group(1) if m else value


def test_compose_env_is_complete_and_known():
    doc = compose()
    for name, svc in doc["services"].items():
        if name == "lb":
            continue
        binary = svc["command"][0]
        env = set(compose_env(svc)) - OUTSIDE
        assert not env - env_of(binary), (name, env - env_of(binary))
        # Every setting of the binary can be given through the shell running compose.
        assert not env_of(binary) - env, (name, env_of(binary) - env)
        test = svc["healthcheck"]["test"]
        assert test[1:4] == ["kt", "healthcheck", "--quiet"], test


def test_compose_addresses_and_plan():
    doc = compose()
    svcs = doc["services"]

    def listen_port(service, var):
        return default(compose_env(svcs[service])[var]).rsplit(":", 1)[1]

    servers = plan_servers(PLAN.read_text())
    worker_env = compose_env(svcs["worker"])
    for spec in default(worker_env["KT_WORKER_EXPERT"]).split(","):
        name, addr = spec.split("=", 1)
        host, port = addr.rsplit(":", 1)
        assert host in svcs, host
        assert compose_env(svcs[host])["KT_EXPERT_NAME"] == name
        assert port == listen_port(host, "KT_EXPERT_LISTEN")
        servers.discard(name)
    assert not servers, f"plan servers without an address: {servers}"
    for addr in default(compose_env(svcs["gateway"])["KT_GATEWAY_WORKERS"]).split(","):
        host, port = addr.rsplit(":", 1)
        assert host == "worker" and port == listen_port("worker", "KT_WORKER_LISTEN")
    lb = compose_env(svcs["lb"])["KT_LB_UPSTREAM"]
    assert lb == "gateway:" + listen_port("gateway", "KT_GATEWAY_LISTEN")
    # Worker and expert servers mount the same shared /dev/shm volume.
    for s in ("worker", "expert-numa0", "expert-numa1"):
        shm = [v for v in svcs[s]["volumes"] if isinstance(v, dict) and v["target"] == "/dev/shm"]
        assert len(shm) == 1 and shm[0]["source"] == "shm", s
        # Not a copy of the image's /dev/shm (root 0755) but the volume's own 1777.
        assert shm[0]["volume"] == {"nocopy": True}, s
    assert "mode=1777" in doc["volumes"]["shm"]["driver_opts"]["o"]
    assert doc["networks"]["back"]["internal"] is True


def test_the_plan_fits_the_default_model():
    exe = bin_dir() / "kt"
    if not exe.exists():
        if os.environ.get("KT_E2E_REQUIRE_BINARIES") == "1":
            pytest.fail(f"{exe} is missing")
        pytest.skip(f"{exe} is missing")
    out = subprocess.run([str(exe), "plan", "check", "--model", str(FIXTURE), "--plan", str(PLAN)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
