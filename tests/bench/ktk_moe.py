#!/usr/bin/env python3
"""kt-kernel's CPU MoE operator on one MoE layer's shapes: µs per layer call.

Run by the python of a venv with `kt-kernel==0.7.2` (and its `torch==2.9.1`); compare_peers.py
starts it. The API used is kt-kernel's own low-level one, the one its `KTMoEWrapper` backends
call (kt_kernel/utils/amx.py `load_weights_from_tensors`, kt_kernel/experts_base.py):

    pool = kt_kernel_ext.CPUInfer(WorkerPoolConfig)        # the worker threads
    cfg  = kt_kernel_ext.moe.MOEConfig(experts, top_k, hidden, ff, gpu_experts_mask_ptr)
    cfg.pool, cfg.max_len, cfg.gate_proj/up_proj/down_proj = BF16 [E, ff, hidden] / [E, hidden, ff]
    moe  = kt_kernel_ext.moe.AMXInt8_MOE(cfg)               # or AMXInt4_MOE, AMXBF16_MOE
    pool.submit(moe.load_weights_task(physical_to_logical_ptr)); pool.sync()   # online quant
    pool.submit(moe.forward_task(qlen_i32_ptr, top_k, ids_i64_ptr, weights_f32_ptr,
                                 in_bf16_ptr, out_bf16_ptr, False)); pool.sync()

The wrapper itself is not used: it allocates pinned (CUDA host) buffers, which need a GPU.
Every call gets a fresh uniformly random top-k routing (as `kt bench experts` does), so the
active experts come from DRAM, not from the cache of the previous call. Weights are random
BF16 (the INT8/INT4 backends quantize them when loading). Prints a table, or one JSON object
with --json. Formats the installed build lacks are reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# format name -> (kt_kernel_ext.moe class names to try, in order; bytes per weight)
FORMATS = {
    "int8": (("AMXInt8_MOE",), 1.0),
    "int4": (("AMXInt4_MOE",), 0.5),
    "bf16": (("AMXBF16_MOE", "AVX2BF16_MOE"), 2.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="worker threads (one subpool)")
    p.add_argument("--tokens", default="1,512", help="tokens per call, comma-separated")
    p.add_argument("--formats", default="int8,bf16,int4",
                   help=f"backends, comma-separated, from {','.join(FORMATS)}")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ff", type=int, default=1408, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds of measuring per case (at least 3 calls after 1 warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    tokens = sorted({int(t) for t in a.tokens.split(",") if t.strip()})
    formats = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    out = {"threads": a.threads, "hidden": a.hidden, "ff": a.ff, "experts": a.experts,
           "top_k": a.top_k, "results": [], "errors": {}}
    try:
        import torch
        import kt_kernel
        from kt_kernel import kt_kernel_ext
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        out["errors"]["import"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out) if a.json else f"cannot import kt_kernel: {e}")
        return 1
    out["version"] = getattr(kt_kernel, "__version__", "?")
    out["isa"] = getattr(kt_kernel, "__cpu_variant__", "?")
    out["int8_kernel"] = getattr(kt_kernel, "__int8_kernel__", "?")
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, a.threads))

    wc = kt_kernel_ext.WorkerPoolConfig()
    wc.subpool_count = 1
    wc.subpool_numa_map = [0]
    wc.subpool_thread_count = [a.threads]
    pool = kt_kernel_ext.CPUInfer(wc)

    E, K, H, I = a.experts, a.top_k, a.hidden, a.ff
    max_len = max(tokens)
    # Random BF16 weights, small so that nothing overflows (values do not matter for speed).
    gate = (torch.randn(E, I, H) / 100).to(torch.bfloat16).contiguous()
    up = (torch.randn(E, I, H) / 100).to(torch.bfloat16).contiguous()
    down = (torch.randn(E, H, I) / 100).to(torch.bfloat16).contiguous()
    p2l = torch.arange(E, dtype=torch.int64).contiguous()
    gpu_mask = torch.zeros(E, dtype=torch.bool).contiguous()  # every expert on the CPU
    moe_mod = kt_kernel_ext.moe

    for f in formats:
        if f not in FORMATS:
            out["errors"][f] = f"unknown format (known: {', '.join(FORMATS)})"
            continue
        names, bpw = FORMATS[f]
        cls = next((getattr(moe_mod, n) for n in names if getattr(moe_mod, n, None)), None)
        if cls is None:
            out["errors"][f] = f"this kt-kernel build ({out['isa']}) has none of {names}"
            continue
        try:
            cfg = moe_mod.MOEConfig(E, K, H, I, gpu_mask.data_ptr())
            cfg.layer_idx = 0
            cfg.pool = pool.backend_
            cfg.max_len = max_len
            cfg.gate_proj = gate.data_ptr()
            cfg.up_proj = up.data_ptr()
            cfg.down_proj = down.data_ptr()
            cfg.save = False  # online quantization in memory, nothing written
            cfg.load = False
            t = time.perf_counter()
            moe = cls(cfg)
            pool.submit(moe.load_weights_task(p2l.data_ptr()))
            pool.sync()
            load_s = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001
            out["errors"][f] = f"{type(e).__name__}: {e}"
            continue
        for n in tokens:
            x = torch.randn(n, H).to(torch.bfloat16).contiguous()
            y = torch.empty(n, H, dtype=torch.bfloat16).contiguous()
            qlen = torch.tensor([n], dtype=torch.int32)
            times = []
            spent = 0.0
            call = 0
            while call <= 3 or spent < a.seconds:
                ids = torch.rand(n, E).argsort(dim=-1)[:, :K].to(torch.int64).contiguous()
                w = torch.softmax(torch.rand(n, K), dim=-1).to(torch.float32).contiguous()
                t = time.perf_counter()
                pool.submit(moe.forward_task(qlen.data_ptr(), K, ids.data_ptr(), w.data_ptr(),
                                             x.data_ptr(), y.data_ptr(), False))
                pool.sync()
                dt = time.perf_counter() - t
                if call > 0:  # the first call is the warm-up
                    times.append(dt)
                    spent += dt
                call += 1
            if not torch.isfinite(y.float()).all():
                out["errors"][f"{f}@{n}"] = "non-finite output"
            med = statistics.median(times)
            hit = min(E, E * (1 - (1 - K / E) ** n))  # expected distinct experts per call
            gb = hit * 3 * H * I * bpw / 1e9
            out["results"].append({
                "format": f, "backend": cls.__name__, "tokens": n, "calls": len(times),
                "median_us": med * 1e6, "min_us": min(times) * 1e6, "load_s": load_s,
                "gbps": gb / med, "tflops": 6 * H * I * n * K / med / 1e12,
            })
        del moe
    if a.json:
        print(json.dumps(out), flush=True)
    else:
        print(f"kt-kernel {out['version']} ({out['isa']}, int8 kernel {out['int8_kernel']}); "
              f"{a.threads} threads; hidden {H}, ff {I}, {E} experts top-{K}")
        print(f"{'format':<6} {'backend':<14} {'tokens':>6} {'calls':>5} {'median µs':>11} "
              f"{'min µs':>11} {'GB/s':>7} {'TFLOPS':>7}")
        for r in out["results"]:
            print(f"{r['format']:<6} {r['backend']:<14} {r['tokens']:>6} {r['calls']:>5} "
                  f"{r['median_us']:>11.1f} {r['min_us']:>11.1f} {r['gbps']:>7.2f} "
                  f"{r['tflops']:>7.3f}")
        for k, v in out["errors"].items():
            print(f"{k}: {v}")
    return 0 if out["results"] else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running kt-kernel's C++ destructors: they print after our output.
    os._exit(rc)
