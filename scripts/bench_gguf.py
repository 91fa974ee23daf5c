#!/usr/bin/env python3
"""Speed of `xllm bench` against llama.cpp's own `llama-bench` on the same GGUF files, with ratios.

Runs are interleaved (one xllm run, then one llama.cpp run, R rounds) so a machine whose load
changes affects both alike; medians over the rounds are compared. Prefill: P prompt tokens at
depth 0 (`llama-bench -p P -n 0`). Decode: N tokens after a P-token context — what `xllm bench`
measures after its prefill — so llama.cpp decodes at the same depth (`llama-bench -p 0 -n N -d P`).

Usage: scripts/bench_gguf.py [-p 128] [-n 32] [-r 5] [--threads 2] [--xllm target/release/xllm]
       MODEL.gguf [MODEL.gguf ...]
A MODEL may be `OURS::PEER.gguf`: xllm runs OURS (e.g. a safetensors folder) and llama-bench
PEER.gguf (llama.cpp's conversion of the same weights; the gpt-oss comparison).
llama-bench is taken from $XLLM_PEERS/llama.cpp/build/bin (default .peers/, scripts/peers.sh).
--avx2 compares the AVX2 paths on both sides, as an AVX2-only CPU runs them: xllm with
XLLM_NO_AVX512=1 against llama.cpp/build-avx2 (`scripts/peers.sh llama.cpp-avx2`).
Only the standard library is needed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xllm_run(exe, model, p, n, threads, env=None):
    out = subprocess.run([exe, "bench", model, "-p", str(p), "-n", str(n), "-r", "1",
                          "--threads", str(threads), "--json"],
                         check=True, capture_output=True, text=True, env=env)
    j = json.loads(out.stdout)
    return j["prefill_tokens_per_second"], j["decode_tokens_per_second"], j.get("weights", "?")


def llama_bench(exe, model, args, threads):
    out = subprocess.run([exe, "-m", model, "-t", str(threads), "-r", "1", "-o", "json", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=5, help="interleaved rounds (medians are compared)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--xllm", default=os.path.join(ROOT, "target/release/xllm"))
    ap.add_argument("--avx2", action="store_true",
                    help="AVX2 paths on both sides (XLLM_NO_AVX512=1 vs llama.cpp/build-avx2)")
    a = ap.parse_args()
    peers = os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers"))
    build = "build-avx2" if a.avx2 else "build"
    bench = os.path.join(peers, "llama.cpp", build, "bin/llama-bench")
    if not os.access(bench, os.X_OK):
        setup = "llama.cpp-avx2" if a.avx2 else "llama.cpp"
        sys.exit(f"no {bench}: run scripts/peers.sh {setup} (or set XLLM_PEERS)")
    env = dict(os.environ, XLLM_NO_AVX512="1") if a.avx2 else None
    rows = []
    for model in a.models:
        ours, peer = model.split("::", 1) if "::" in model else (model, model)
        xp, xd, lp, ld = [], [], [], []
        weights = "?"
        for _ in range(a.r):
            p, d, weights = xllm_run(a.xllm, ours, a.p, a.n, a.threads, env)
            xp.append(p)
            xd.append(d)
            lp.append(llama_bench(bench, peer, ["-p", str(a.p), "-n", "0"], a.threads))
            ld.append(llama_bench(bench, peer, ["-p", "0", "-n", str(a.n), "-d", str(a.p)],
                                  a.threads))
        m = statistics.median
        rows.append((os.path.basename(ours.rstrip("/")), weights, m(xp), m(lp), m(xd), m(ld)))
        print(json.dumps({"model": model, "weights": weights, "xllm_prefill": xp,
                          "llama_prefill": lp, "xllm_decode": xd, "llama_decode": ld}),
              file=sys.stderr)
    print(f"{'AVX2 paths (XLLM_NO_AVX512=1 vs llama.cpp build-avx2), ' if a.avx2 else ''}"
          f"threads {a.threads}, prefill {a.p} tokens, decode {a.n} tokens at depth {a.p}, "
          f"medians of {a.r} interleaved rounds (tokens/s)")
    print(f"{'model':36} {'type':8} {'prefill xllm':>12} {'llama.cpp':>10} {'ratio':>6}"
          f" {'decode xllm':>12} {'llama.cpp':>10} {'ratio':>6}")
    for name, w, xp, lp, xd, ld in rows:
        print(f"{name:36} {w:8} {xp:12.1f} {lp:10.1f} {xp / lp:6.2f} {xd:12.1f} {ld:10.1f}"
              f" {xd / ld:6.2f}")


if __name__ == "__main__":
    main()
