#!/usr/bin/env python3
"""kt against its peers on one GGUF, one CPU and the same thread counts, in one run.

What is measured (tests/bench/README.md says more):
  kt        `kt bench experts`: one MoE layer's routed experts at 1 token (decode) and
            --prefill-tokens tokens (prefill), in the file's own formats, plus the same layer
            repacked to int8 (`--int8`, AMX where the CPU has it).
            `kt bench generate` (whole model, prefill and decode tokens/s) when this kt has it.
  llama     `llama-bench -m FILE -t T -p P -n G`: whole-model prefill (pp) and decode (tg).
  ktkernel  kt-kernel's CPU MoE operator (tests/bench/ktk_moe.py run by the kt-kernel venv's
            python) on the layer's shapes, per backend (INT8 / BF16 / INT4 ...), 1 and
            --prefill-tokens tokens.

Only the standard library is used here; each peer runs as its own process. A missing peer is
reported and skipped, never an error of the whole run (unless nothing could run at all).
This is a benchmark, not a test: it prints numbers and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PEERS = ("kt", "llama", "ktkernel")
DEFAULT_MODEL = Path(
    os.environ.get("KT_BENCH_CACHE", Path.home() / ".cache" / "kt" / "bench")
) / "v2-lite-q4_k_m.gguf"


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    ncpu = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        description=(
            "Run kt, llama.cpp (llama-bench) and kt-kernel side by side on one GGUF and the "
            "same thread counts; print each one's numbers and kt/peer ratios."
        ),
        epilog=(
            "Every flag also reads the environment variable named in its help. "
            "Example: tests/bench/compare_peers.py --synth --threads 1,2 "
            "--llama-bench /work/peers/llama-build/bin/llama-bench "
            "--ktk-python /work/peers/ktk-venv/bin/python"
        ),
    )
    p.add_argument("--model", type=Path, default=env("KT_BENCH_MODEL"),
                   help="GGUF file (a DeepSeek-V2-Lite-shaped one for the kt-kernel rows) "
                        "[KT_BENCH_MODEL]")
    p.add_argument("--synth", action="store_true",
                   default=env("KT_BENCH_SYNTH", "") not in ("", "0"),
                   help="when --model is not given or does not exist, write it with `kt synth "
                        "--preset v2-lite --quant q4_k_m` (full model ≈ 9 GiB unless "
                        f"--synth-layers); default path {DEFAULT_MODEL} [KT_BENCH_SYNTH]")
    p.add_argument("--synth-layers", type=int, default=env("KT_BENCH_SYNTH_LAYERS"),
                   help="keep only N layers in the synthesized file (enough for the layer "
                        "rows; the whole-model rows then describe a cut-down model) "
                        "[KT_BENCH_SYNTH_LAYERS]")
    p.add_argument("--threads", default=env("KT_BENCH_THREADS", ",".join(
                       dict.fromkeys(["1", str(ncpu)]))),
                   help="thread counts, comma-separated; every peer runs at each "
                        f"(default 1,{ncpu}: ggml's and kt-kernel's threads busy-wait, so on a "
                        "small or busy machine 1 thread is the fairer decode figure) "
                        "[KT_BENCH_THREADS]")
    p.add_argument("--only", default=env("KT_BENCH_ONLY", ",".join(PEERS)),
                   help="peers to run, comma-separated from kt,llama,ktkernel [KT_BENCH_ONLY]")
    p.add_argument("--prompt-len", type=int, default=int(env("KT_BENCH_PROMPT_LEN", "512")),
                   help="whole-model prefill tokens (llama-bench -p) [KT_BENCH_PROMPT_LEN]")
    p.add_argument("--gen-len", type=int, default=int(env("KT_BENCH_GEN_LEN", "64")),
                   help="whole-model decode tokens (llama-bench -n) [KT_BENCH_GEN_LEN]")
    p.add_argument("--prefill-tokens", type=int,
                   default=int(env("KT_BENCH_PREFILL_TOKENS", "512")),
                   help="tokens per layer call for the layer's prefill rows "
                        "[KT_BENCH_PREFILL_TOKENS]")
    p.add_argument("--seconds", type=float, default=float(env("KT_BENCH_SECONDS", "2")),
                   help="seconds of measuring per layer case (kt and kt-kernel) "
                        "[KT_BENCH_SECONDS]")
    p.add_argument("--reps", type=int, default=int(env("KT_BENCH_REPS", "3")),
                   help="llama-bench repetitions (-r) [KT_BENCH_REPS]")
    p.add_argument("--no-whole-model", action="store_true",
                   default=env("KT_BENCH_NO_WHOLE_MODEL", "") not in ("", "0"),
                   help="layer rows only: skip llama-bench and kt bench generate "
                        "[KT_BENCH_NO_WHOLE_MODEL]")
    p.add_argument("--kt", type=Path, default=env("KT_BIN"),
                   help="the kt binary (default: $CARGO_TARGET_DIR/release/kt, "
                        "/work/target-peers/release/kt, target/release/kt, kt on PATH) [KT_BIN]")
    p.add_argument("--llama-bench", type=Path, default=env("LLAMA_BENCH"),
                   help="the llama-bench binary (default: llama-bench on PATH) [LLAMA_BENCH]")
    p.add_argument("--llama-args", default=env("KT_BENCH_LLAMA_ARGS", ""),
                   help="extra llama-bench arguments, e.g. '-ngl 99 -ot exps=CPU' for a CUDA "
                        "build [KT_BENCH_LLAMA_ARGS]")
    p.add_argument("--ktk-python", type=Path, default=env("KTK_PYTHON"),
                   help="python of the venv with kt-kernel installed "
                        "(default: /work/peers/ktk-venv/bin/python) [KTK_PYTHON]")
    p.add_argument("--ktk-formats", default=env("KTK_FORMATS", "int8,bf16,int4"),
                   help="kt-kernel backends, comma-separated (see ktk_moe.py --help) "
                        "[KTK_FORMATS]")
    p.add_argument("--json", type=Path, default=env("KT_BENCH_JSON_OUT"),
                   help="also write every raw number to this JSON file [KT_BENCH_JSON_OUT]")
    a = p.parse_args(argv)
    try:
        a.threads = sorted({int(t) for t in str(a.threads).split(",") if t.strip()})
    except ValueError:
        p.error(f"--threads: `{a.threads}` is not a comma-separated list of integers")
    if not a.threads or min(a.threads) < 1:
        p.error("--threads: each thread count must be at least 1")
    a.only = [s.strip() for s in str(a.only).split(",") if s.strip()]
    bad = [s for s in a.only if s not in PEERS]
    if bad:
        p.error(f"--only: {', '.join(bad)} not among {','.join(PEERS)}")
    if a.synth_layers is not None:
        a.synth_layers = int(a.synth_layers)
    a.ktk_formats = [s.strip() for s in a.ktk_formats.split(",") if s.strip()]
    return a


# ---------------------------------------------------------------- helpers


def run(cmd: list[str], timeout: float | None = None, env: dict | None = None):
    """Runs cmd; returns (rc, stdout, stderr); rc None when it could not start."""
    log("$ " + " ".join(str(c) for c in cmd))
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except FileNotFoundError as e:
        return None, "", str(e)
    except subprocess.TimeoutExpired as e:
        return None, e.stdout or "", f"timed out after {timeout} s"
    return r.returncode, r.stdout, r.stderr


def last_json(text: str):
    """The last top-level JSON object or array in text that starts a line (pretty-printed or
    one line); lines of other output before or after it are skipped. None if there is none."""
    dec = json.JSONDecoder()
    found, covered, pos = None, 0, 0
    for line in text.splitlines(keepends=True):
        s = line.lstrip()
        i = pos + len(line) - len(s)
        pos += len(line)
        if i < covered or not s.startswith(("{", "[")):
            continue
        try:
            v, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        found, covered = v, end
    return found


def tail(text: str, n: int = 6) -> str:
    return "\n".join("    " + ln for ln in text.strip().splitlines()[-n:])


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            info["cpu"] = m.group(1).strip()
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        if flags:
            f = set(flags.group(1).split())
            info["isa"] = ",".join(x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                               "amx_bf16", "amx_int8") if x in f)
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text()
        m = re.search(r"MemTotal:\s*(\d+) kB", mem)
        if m:
            info["mem_gib"] = round(int(m.group(1)) / 2**20, 1)
    except OSError:
        pass
    try:
        info["load"] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------- finding things


def find_kt(a) -> Path | None:
    cands = [a.kt] if a.kt else []
    if not a.kt:
        if os.environ.get("CARGO_TARGET_DIR"):
            cands.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "kt")
        cands += [Path("/work/target-peers/release/kt"), REPO / "target" / "release" / "kt"]
        w = shutil.which("kt")
        if w:
            cands.append(Path(w))
    for c in cands:
        if c and c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_llama_bench(a) -> Path | None:
    if a.llama_bench:
        return a.llama_bench if a.llama_bench.is_file() else None
    w = shutil.which("llama-bench")
    return Path(w) if w else None


def find_ktk_python(a) -> Path | None:
    c = a.ktk_python or Path("/work/peers/ktk-venv/bin/python")
    return c if c.is_file() else None


def ensure_model(a, kt: Path | None) -> Path | None:
    if a.model and a.model.is_file():
        return a.model
    if not a.synth:
        if a.model:
            log(f"model {a.model} does not exist (add --synth to write it)")
        else:
            log("no --model given (add --synth to write a synthetic DeepSeek-V2-Lite)")
        return None
    out = a.model or DEFAULT_MODEL
    if out.is_file():
        return out
    if kt is None:
        log("--synth needs the kt binary (see --kt)")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [kt, "synth", "--preset", "v2-lite", "--quant", "q4_k_m", "-o", out]
    if a.synth_layers:
        cmd += ["--layers", str(a.synth_layers)]
    log(f"writing {out} (the full model is ~9 GiB and takes minutes)")
    t = time.time()
    rc, so, se = run(cmd)
    if rc != 0:
        log(f"kt synth failed (rc {rc}):\n{tail(so + se)}")
        return None
    log(f"wrote {out} in {time.time() - t:.0f} s")
    return out


# ---------------------------------------------------------------- kt


def kt_experts(kt: Path, model: Path, threads: int, a) -> dict:
    """Best µs per layer call at 1 and prefill tokens, file formats and int8."""
    tokens = sorted({1, a.prefill_tokens})
    cmd = [kt, "bench", "experts", "--model", model, "--threads", threads,
           "--tokens", ",".join(map(str, tokens)), "--seconds", a.seconds, "--json"]
    rc, so, _ = run([kt, "bench", "experts", "--help"])
    if rc == 0 and "--int8" in so:  # an older kt has no int8 repack
        cmd.append("--int8")
    rc, so, se = run(cmd)
    if rc != 0:
        return {"error": f"kt bench experts failed (rc {rc}):\n{tail(so + se)}"}
    j = last_json(so)
    if not isinstance(j, dict):
        return {"error": "kt bench experts printed no JSON"}
    isa = " ".join(dict.fromkeys(str(j.get("isa", "?")).split()))  # one per format: dedupe
    out = {"formats": j.get("formats"), "isa": isa, "dram_gbps": j.get("dram_gbps"),
           "shape": f"hidden {j.get('hidden')}, ff {j.get('ff')}, {j.get('experts')} experts "
                    f"top-{j.get('top_k')}", "raw": j}
    for r in j.get("results", []):
        kind = "int8" if r["schedule"].startswith("int8") else "file"
        key = (kind, r["tokens"])
        best = out.get(key)
        if best is None or r["median_us"] < best["us"]:
            out[key] = {"us": r["median_us"], "schedule": r["schedule"]}
    return out


def kt_has_generate(kt: Path) -> bool:
    rc, so, se = run([kt, "bench", "--help"])
    return rc == 0 and re.search(r"^\s+generate\b", so, re.M) is not None


def find_rate(obj, words: tuple[str, ...]):
    """First number in a JSON tree whose key path contains all words and looks like a rate."""
    def walk(o, path):
        if isinstance(o, dict):
            for k, v in o.items():
                yield from walk(v, path + [str(k).lower()])
        elif isinstance(o, list):
            for v in o:
                yield from walk(v, path)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            yield path, o
    for path, v in walk(obj, []):
        key = "/".join(path)
        if all(w in key for w in words) and re.search(r"tok.*s|per_s|/s|tps", key):
            return float(v)
    return None


def kt_generate(kt: Path, model: Path, threads: int, a) -> dict:
    cmd = [kt, "bench", "generate", "--model", model, "--prompt-len", a.prompt_len,
           "--gen-len", a.gen_len, "--threads", threads]
    rc, so, se = run(cmd + ["--json"])
    if rc != 0:  # perhaps no --json: try the table
        rc, so, se = run(cmd)
    if rc != 0:
        return {"error": f"kt bench generate failed (rc {rc}):\n{tail(so + se)}"}
    j = last_json(so)
    res = {"raw": j if j is not None else so.strip()[-2000:]}
    if j is not None:
        res["pp"] = find_rate(j, ("prefill",)) or find_rate(j, ("prompt",))
        res["tg"] = find_rate(j, ("decode",)) or find_rate(j, ("gen",))
    else:
        for line in so.splitlines():
            m = re.search(r"([\d.]+)\s*tok(?:ens)?/s", line)
            if not m:
                continue
            if re.search(r"prefill|prompt", line, re.I):
                res.setdefault("pp", float(m.group(1)))
            elif re.search(r"decode|generat", line, re.I):
                res.setdefault("tg", float(m.group(1)))
    if res.get("pp") is None and res.get("tg") is None:
        res["error"] = "kt bench generate: could not read prefill/decode tokens/s from:\n" + \
            tail(so)
    return res


# ---------------------------------------------------------------- llama.cpp


def llama(lb: Path, model: Path, threads: int, a) -> dict:
    cmd = [lb, "-m", model, "-t", threads, "-p", a.prompt_len, "-n", a.gen_len,
           "-r", a.reps, "-o", "json"] + a.llama_args.split()
    rc, so, se = run(cmd)
    note = ""
    if rc != 0 and "--repack" not in a.llama_args:
        # Seen with a GGML_NATIVE build on an AMX VM: the repacked (AMX / interleaved) weight
        # buffers abort in the scheduler (GGML_ASSERT cur_backend_id) or hit SIGILL. Plain
        # buffers work; say so in the table rather than give no llama.cpp numbers at all.
        why = next((ln.strip() for ln in se.splitlines() if "GGML_ASSERT" in ln),
                   f"rc {rc}")
        log(f"llama-bench failed ({why}); again with --repack 0")
        rc, so, se = run(cmd + ["--repack", "0"])
        note = "--repack 0 (repacked weights: " + \
            ("GGML_ASSERT)" if "GGML_ASSERT" in why else f"{why})")
    if rc != 0:
        return {"error": f"llama-bench failed (rc {rc}):\n{tail(so + se)}"}
    j = last_json(so)
    if not isinstance(j, list):
        return {"error": "llama-bench printed no JSON array:\n" + tail(so + se)}
    out = {"raw": j, "note": note}
    for t in j:
        if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
            out["pp"], out["pp_sd"] = t.get("avg_ts"), t.get("stddev_ts")
        elif t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
            out["tg"], out["tg_sd"] = t.get("avg_ts"), t.get("stddev_ts")
        out["build"] = f"{t.get('build_commit', '?')} {t.get('backends', '')}".strip()
    return out


# ---------------------------------------------------------------- kt-kernel


def ktkernel(py: Path, threads: int, shape: dict, a) -> dict:
    tokens = sorted({1, a.prefill_tokens})
    cmd = [py, HERE / "ktk_moe.py", "--threads", threads, "--tokens",
           ",".join(map(str, tokens)), "--formats", ",".join(a.ktk_formats),
           "--seconds", a.seconds, "--hidden", shape["hidden"], "--ff", shape["ff"],
           "--experts", shape["experts"], "--top-k", shape["top_k"], "--json"]
    rc, so, se = run(cmd)
    j = last_json(so)
    if not isinstance(j, dict):
        return {"error": f"ktk_moe.py failed (rc {rc}):\n{tail(so + se, 10)}"}
    out = {"raw": j, "errors": j.get("errors", {}), "isa": j.get("isa")}
    for r in j.get("results", []):
        out[(r["format"], r["tokens"])] = {"us": r["median_us"]}
    return out


# ---------------------------------------------------------------- table


def fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def ratio(kt_speed, peer_speed):
    if kt_speed is None or peer_speed in (None, 0):
        return "—"
    return f"{kt_speed / peer_speed:.2f}×"


def print_table(rows: list[tuple]) -> None:
    """rows: (what, engine, detail, decode, prefill, ratio_decode, ratio_prefill) strings."""
    head = ("what", "engine", "formats / notes", "decode", "prefill", "kt/peer dec",
            "kt/peer pre")
    allr = [head] + rows
    w = [max(len(str(r[i])) for r in allr) for i in range(len(head))]
    for k, r in enumerate(allr):
        print("  ".join(str(c).ljust(w[i]) if i < 3 else str(c).rjust(w[i])
                        for i, c in enumerate(r)))
        if k == 0:
            print("  ".join("-" * x for x in w))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    info = machine()
    kt = find_kt(a)
    lb = find_llama_bench(a) if "llama" in a.only and not a.no_whole_model else None
    py = find_ktk_python(a) if "ktkernel" in a.only else None
    missing = {}
    if kt is None and ("kt" in a.only or a.synth):
        missing["kt"] = ("kt binary not found: build it with `cargo build --release -p kt` "
                         "and pass --kt or KT_BIN")
    if "llama" in a.only and not a.no_whole_model and lb is None:
        missing["llama"] = ("llama-bench not found: pass --llama-bench or LLAMA_BENCH "
                            "(tests/bench/README.md says how to build it)" +
                            (f"; {a.llama_bench} does not exist" if a.llama_bench else ""))
    if "ktkernel" in a.only and py is None:
        missing["ktkernel"] = ("kt-kernel venv not found: pass --ktk-python or KTK_PYTHON "
                               "(a python with kt-kernel==0.7.2, see tests/bench/README.md)")
    for k, m in missing.items():
        log(f"MISSING {k}: {m}")

    need_model = ("kt" in a.only and kt) or (lb is not None)
    model = ensure_model(a, kt) if (need_model or a.model or a.synth) else None
    if need_model and model is None:
        log("no model: the kt and llama.cpp rows are skipped")

    results: dict = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(a).items()},
                     "model": str(model) if model else None, "missing": missing, "runs": {}}
    # The layer shape for kt-kernel: kt's own report of the file, else DeepSeek-V2-Lite's.
    shape = {"hidden": 2048, "ff": 1408, "experts": 64, "top_k": 6}
    have_gen = kt is not None and model is not None and "kt" in a.only and \
        not a.no_whole_model and kt_has_generate(kt)
    if kt is not None and "kt" in a.only and not a.no_whole_model and not have_gen:
        log("this kt has no `kt bench generate`: no whole-model kt rows")

    t0 = time.time()
    for th in a.threads:
        r = results["runs"].setdefault(th, {})
        if kt and model and "kt" in a.only:
            r["kt_experts"] = kt_experts(kt, model, th, a)
            raw = r["kt_experts"].get("raw")
            if raw:
                shape = {"hidden": raw["hidden"], "ff": raw["ff"], "experts": raw["experts"],
                         "top_k": raw["top_k"]}
            if have_gen:
                r["kt_generate"] = kt_generate(kt, model, th, a)
        if py:
            r["ktkernel"] = ktkernel(py, th, shape, a)
        if lb and model:
            r["llama"] = llama(lb, model, th, a)
    info["load_after"] = os.getloadavg()
    info["seconds"] = round(time.time() - t0)

    # ---- report
    print()
    print(f"machine: {info['cpu']}; {info['cpus']} CPUs; {info.get('mem_gib', '?')} GiB; "
          f"ISA {info.get('isa', '?')}")
    busy = (" — a busy machine: ggml's and kt-kernel's threads busy-wait, so their "
            "multi-thread numbers collapse under load") if info["load"][0] > 0.5 else ""
    print(f"load average before {info['load'][0]:.2f}, after {info['load_after'][0]:.2f} "
          f"(1 min){busy}")
    print(f"model: {model or '—'}")
    print(f"layer: {shape['hidden']} hidden, {shape['ff']} ff, {shape['experts']} experts "
          f"top-{shape['top_k']}; layer decode = 1 token, layer prefill = "
          f"{a.prefill_tokens} tokens per call (median µs per call, random routing)")
    print(f"whole model: prefill pp{a.prompt_len}, decode tg{a.gen_len} (tokens/s)")
    for k, m in missing.items():
        print(f"MISSING {k}: {m}")
    n = a.prefill_tokens
    for th in a.threads:
        r = results["runs"][th]
        print(f"\n== {th} thread{'s' if th > 1 else ''}")
        rows = []
        kx = r.get("kt_experts", {})
        if kx.get("dram_gbps"):
            print(f"DRAM read bandwidth (kt's measure, {th} thread{'s' if th > 1 else ''}): "
                  f"{kx['dram_gbps']:.1f} GB/s")
        for e in [v for k, v in r.items() if isinstance(v, dict) and v.get("error")]:
            print("ERROR " + e["error"])
        if "ktkernel" in r:
            for f, e in r["ktkernel"].get("errors", {}).items():
                print(f"kt-kernel {f}: {e}")
        # Layer rows: decode in µs per layer call, prefill in tokens/s.
        def layer_row(engine, notes, dec, pre, ref_dec=None, ref_pre=None):
            dec_us = dec["us"] if dec else None
            pre_tps = n / (pre["us"] * 1e-6) if pre else None
            rd = ratio(1 / ref_dec["us"] if ref_dec else None, 1 / dec_us if dec_us else None) \
                if ref_dec is not None else ""
            rp = ratio(n / (ref_pre["us"] * 1e-6) if ref_pre else None, pre_tps) \
                if ref_pre is not None else ""
            return ("layer", engine, notes,
                    f"{fmt(dec_us)} µs" if dec_us else "—",
                    f"{fmt(pre_tps)} tok/s" if pre_tps else "—", rd, rp)
        kt_file = (kx.get(("file", 1)), kx.get(("file", n)))
        kt_int8 = (kx.get(("int8", 1)), kx.get(("int8", n)))
        if kx and not kx.get("error"):
            rows.append(layer_row("kt", f"{kx['formats']} ({kx['isa']})" +
                                  (f" [{kt_file[1]['schedule']}]" if kt_file[1] else ""),
                                  *kt_file))
            if any(kt_int8):  # an older kt has no --int8
                rows.append(layer_row("kt", "int8 repack" +
                                      (f" [{kt_int8[1]['schedule']}]" if kt_int8[1] else ""),
                                      *kt_int8))
        kk = r.get("ktkernel", {})
        for f in a.ktk_formats:
            dec, pre = kk.get((f, 1)), kk.get((f, n))
            if dec is None and pre is None:
                continue
            # Compare like with like where kt has it (int8 ↔ int8), else kt's file formats.
            ref = kt_int8 if f.lower().startswith("int8") and any(kt_int8) else kt_file
            rows.append(layer_row("kt-kernel", f"{f} ({kk.get('isa') or '?'})", dec, pre,
                                  ref[0] or {}, ref[1] or {}))
        # Whole-model rows: tokens/s.
        kg, ll = r.get("kt_generate", {}), r.get("llama", {})
        if kg and not kg.get("error"):
            rows.append(("model", "kt", "bench generate", f"{fmt(kg.get('tg'))} tok/s",
                         f"{fmt(kg.get('pp'))} tok/s", "", ""))
        if ll and not ll.get("error"):
            rows.append(("model", "llama.cpp", f"llama-bench {ll.get('build', '')} "
                         f"{ll.get('note', '')}".strip(),
                         f"{fmt(ll.get('tg'))}±{fmt(ll.get('tg_sd'))} tok/s",
                         f"{fmt(ll.get('pp'))}±{fmt(ll.get('pp_sd'))} tok/s",
                         ratio(kg.get("tg"), ll.get("tg")), ratio(kg.get("pp"), ll.get("pp"))))
        if rows:
            print_table(rows)
        else:
            print("(nothing ran)")
    print("\nkt/peer: kt's speed ÷ the peer's (>1: kt faster). kt-kernel int8 rows are set "
          "against kt's int8 repack where this kt has one, the others against kt's file "
          "formats. Layer decode is "
          "µs per layer call (lower is better), everything else tokens/s.")
    if a.json:
        def keyfix(o):
            if isinstance(o, dict):
                return {(k if isinstance(k, str) else ":".join(map(str, k))
                         if isinstance(k, tuple) else str(k)): keyfix(v) for k, v in o.items()}
            if isinstance(o, list):
                return [keyfix(v) for v in o]
            return o
        a.json.write_text(json.dumps(keyfix(results), indent=1, default=str))
        log(f"wrote {a.json}")
    ran = any(v for r in results["runs"].values() for v in r.values()
              if isinstance(v, dict) and not v.get("error"))
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
