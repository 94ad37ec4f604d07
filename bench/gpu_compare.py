#!/usr/bin/env python3
"""Our GPU engine against PyTorch on the same tensors, in one run (GPU machine).

For each context length N it writes a synthetic context with Llama-3-8B
attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16, one layer)
with `sqctl synth`, indexes it with `sqctl build-index`, runs `gpu_bench`
(our engine: dense kernels, budget flat and hierarchical, each one layer's
call captured in a CUDA graph), then loads the same K and V from the
safetensors file into PyTorch and times, the same way (CUDA graph, events):

  - scaled_dot_product_attention, dense, enable_gqa (the baseline);
  - FlexAttention (torch.compile) with a block mask keeping the same budget
    of 128-token blocks (the blocks with the highest mean key score; the mask
    is built outside the timing, which favours FlexAttention).

With --prefill-T T, the same three at prefill (T queries per call, the
FLOP floor at the bf16 matrix-product rate measured in the same run).

Prints one JSON object per line and a table. Usage (see docs/PERFORMANCE.md):
  python3 bench/gpu_compare.py --sqctl BIN --gpu-bench BIN [--tokens 32768,131072]
      [--batch-contexts 32] [--prefill-T 2048] [--variant-env SQZ_GPU_DECODE_SIMT=1] [--work DIR]
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def load_safetensors(path, names):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name in names:
            meta = header[name]
            a, b = meta["data_offsets"]
            f.seek(base + a)
            raw = bytearray(f.read(b - a))
            dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[meta["dtype"]]
            out[name] = torch.frombuffer(raw, dtype=dt).reshape(meta["shape"])
        return out


def time_graph(fn, iters=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(10):
        g.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / iters


def run(cmd, env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def flex_time(q, k, v, out, budget, iters):
    """FlexAttention (torch.compile) keeping `budget` of each KV head's
    128-token blocks: those with the highest mean key score against the
    group's mean query (over heads and tokens; chosen outside the timing,
    which favours FlexAttention). q [1, 32, T, 128], k / v [1, 8, N, 128].
    Returns (us per call, keys kept per KV head)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    blk, n, T = 128, k.shape[2], q.shape[2]
    nb = n // blk
    keep = max(1, int(round(nb * budget)))
    kb = k[0].float().reshape(8, nb, blk, 128).mean(2)  # [8, nb, 128]
    qg = q[0].float().mean(1).reshape(8, 4, 128).mean(1)  # [8, 128]
    top = torch.einsum("hbd,hd->hb", kb, qg).topk(keep, dim=1).indices
    table = torch.zeros(8, nb, dtype=torch.bool, device=q.device)
    table.scatter_(1, top, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return table[h // 4, kv_idx // blk]

    bm = create_block_mask(mask_mod, 1, 32, T, n, device=q.device, BLOCK_SIZE=blk)
    flex = torch.compile(flex_attention, dynamic=False)

    def fx():
        out.copy_(flex(q, k, v, block_mask=bm, enable_gqa=True))

    return time_graph(fx, iters), keep * blk


def matmul_tflops(dev, n=8192, iters=20):
    """bf16 n^3 matrix product rate on this GPU (the prefill floor's rate)."""
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    us = time_graph(lambda: torch.mm(x, y), iters)
    return 2.0 * n ** 3 / us / 1e6


def prefill(a, n, db, k, v, dev):
    """Prefill with T = a.prefill_T queries: ours (gpu_bench), SDPA dense,
    FlexAttention keeping the budget's 128-token blocks (by the group's mean
    query); the FLOP floor at the matmul rate measured here."""
    T = a.prefill_T
    out_rows = []
    rate = matmul_tflops(dev)
    r = {"what": "torch", "N": n, "T": T, "method": "matmul_bf16_8192", "TFLOPs": rate}
    print(json.dumps(r))
    out_rows.append(r)
    for x in run([a.gpu_bench, "--db", db, "--context", "ctx_000", "--budgets", str(a.budget), "--T", str(T),
                  "--iters", "10"]).splitlines():
        if x.startswith("{") and "layer_call" in x:
            o = json.loads(x)
            o["N"] = n
            o["prefill"] = True
            o["flop_floor_us"] = o["flops"] / rate / 1e6
            print(json.dumps(o))
            out_rows.append(o)
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, 32, T, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)

    def sdpa():
        out.copy_(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))

    us = time_graph(sdpa, 10)
    flops = 4.0 * 32 * T * n * 128
    r = {"what": "torch", "N": n, "T": T, "prefill": True, "method": "sdpa_dense", "us": us,
         "TFLOPs": flops / us / 1e6}
    print(json.dumps(r))
    out_rows.append(r)
    try:
        us, kept = flex_time(q, k, v, out, a.budget, 10)
        r = {"what": "torch", "N": n, "T": T, "prefill": True, "method": "flex_block_mask", "budget": a.budget,
             "us": us, "TFLOPs": 4.0 * 32 * T * kept * 128 / us / 1e6}
    except Exception as e:  # report, do not hide
        r = {"what": "torch", "N": n, "T": T, "prefill": True, "method": "flex_block_mask", "error": repr(e)[:300]}
    print(json.dumps(r))
    out_rows.append(r)
    return out_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sqctl", required=True)
    ap.add_argument("--gpu-bench", required=True)
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--batch-contexts", type=int, default=0)
    ap.add_argument("--work", default="/tmp/sqz-bench")
    ap.add_argument("--iters", default="4", help="k-means iterations of the index build")
    ap.add_argument("--variant-env", action="append", default=[], metavar="NAME=VALUE",
                    help="also time our decode calls with this environment switch, in the same run "
                    "(e.g. SQZ_GPU_DECODE_SIMT=1: the CUDA-core attention kernel); repeatable")
    ap.add_argument("--prefill-T", type=int, default=0,
                    help="also prefill with this many queries: ours, SDPA dense, FlexAttention at the budget")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rows = []
    dev = torch.device("cuda")
    for n in [int(x) for x in a.tokens.split(",")]:
        corpus, db = f"{a.work}/c{n}", f"{a.work}/d{n}"
        if not os.path.exists(db):
            t0 = time.time()
            run([a.sqctl, "synth", "--out", corpus, "--contexts", "1", "--tokens", str(n), "--layers", "1",
                 "--kv-heads", "8", "--q-heads", "32", "--head-dim", "128", "--dtype", "BF16", "--window", "64",
                 "--queries", "1"])
            run([a.sqctl, "build-index", "--db", db, "--corpus", corpus, "--iters", a.iters, "--quiet"])
            print(f"# N={n}: synth + build {time.time() - t0:.1f} s", file=sys.stderr)
        for variant in [""] + a.variant_env:
            name, _, value = variant.partition("=")
            env = dict(os.environ, **{name: value}) if variant else None
            ours = [json.loads(x) for x in run([a.gpu_bench, "--db", db, "--context", "ctx_000", "--budgets",
                                                str(a.budget)], env).splitlines() if x.startswith("{")]
            for o in ours:
                o["N"] = n
                if variant and "config" in o:
                    o["config"] += f" [{variant}]"
                print(json.dumps(o))
            rows += ours

        t = load_safetensors(f"{corpus}/ctx_000.safetensors", ["layers.0.k", "layers.0.v"])
        k = t["layers.0.k"].to(dev).unsqueeze(0)  # [1, 8, N, 128]
        v = t["layers.0.v"].to(dev).unsqueeze(0)
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        out = torch.empty_like(q)

        def sdpa():
            out.copy_(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))

        us_sdpa = time_graph(sdpa)
        bytes_dense = k.numel() * 2 * 2
        r = {"what": "torch", "N": n, "method": "sdpa_dense", "us": us_sdpa, "GBps": bytes_dense / us_sdpa / 1e3}
        print(json.dumps(r))
        rows.append(r)

        try:
            us_flex, _ = flex_time(q, k, v, out, a.budget, 200)
            r = {"what": "torch", "N": n, "method": "flex_block_mask", "budget": a.budget, "us": us_flex}
        except Exception as e:  # report, do not hide
            r = {"what": "torch", "N": n, "method": "flex_block_mask", "error": repr(e)[:300]}
        print(json.dumps(r))
        rows.append(r)
        if a.prefill_T:
            rows += prefill(a, n, db, k, v, dev)
        del k, v
        torch.cuda.empty_cache()

    if a.batch_contexts:
        n = 32768
        corpus, db = f"{a.work}/batch", f"{a.work}/dbatch"
        if not os.path.exists(db):
            run([a.sqctl, "synth", "--out", corpus, "--contexts", str(a.batch_contexts), "--tokens", str(n),
                 "--layers", "1", "--kv-heads", "8", "--q-heads", "32", "--head-dim", "128", "--dtype", "BF16",
                 "--window", "0", "--queries", "1"])
            run([a.sqctl, "build-index", "--db", db, "--corpus", corpus, "--iters", "2", "--quiet"])
        names = ",".join(f"ctx_{i:03d}" for i in range(a.batch_contexts))
        for x in run([a.gpu_bench, "--db", db, "--context", "ctx_000", "--budgets", str(a.budget),
                      "--batch-contexts", names]).splitlines():
            if x.startswith("{") and "batch" in x:
                print(x)
                rows.append(json.loads(x))

    for prefill_rows in ([False, True] if a.prefill_T else [False]):
        summary(a, rows, prefill_rows)


def summary(a, rows, prefill_rows):
    what = f"prefill T = {a.prefill_T}" if prefill_rows else "decode T = 1"
    print(f"\n# summary (us per layer call, {what})", file=sys.stderr)
    for n in [int(x) for x in a.tokens.split(",")]:
        got = {}
        for r in rows:
            if r.get("N") != n or bool(r.get("prefill")) != prefill_rows:
                continue
            key = r.get("config") or r.get("method")
            if "us" in r:
                got[key] = r["us"]
        base = got.get("sdpa_dense")
        line = " ".join(f"{k}={v:.1f}us({base / v:.2f}x)" for k, v in got.items() if base)
        print(f"N={n}: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
