#!/usr/bin/env python3
"""Nemotron-H speed and memory: `xllm bench` against transformers (torch CPU, its torch path: no
Mamba CUDA kernels) on the same checkpoint, interleaved (xllm, transformers, xllm, ... one round
each), medians of the rounds; and xllm's peak RSS against the checkpoint's bytes.

The checkpoint is the synthetic one with Nemotron 3 Nano's real widths and fewer layers
(scripts/make_synthetic_nemotron.py, written to .dev/nemotron_synthetic, not committed).
transformers runs in bf16 (the checkpoint's dtype) and in f32; the faster one is the peer.
Each transformers round: a prefill of P tokens, then N decode steps of one token with the cache.
Run on a quiet machine, with no other benchmark running.

Usage: $XLLM_PEERS/venv/bin/python scripts/bench_nemotron.py [--model .dev/nemotron_synthetic]
       [--xllm target/release/xllm] [-p 64] [-n 32] [--rounds 3] [--threads 2]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt_ids(vocab, p):
    return [100 + (i * 2654435761) % (vocab - 100) for i in range(p)]


def xllm_round(exe, model, p, n, threads):
    """One `xllm bench` process (one warm-up, one measured repeat): decode tok/s, prefill tok/s,
    peak RSS in bytes (the whole process, load included), measured by /usr/bin/time: a child's
    ru_maxrss from wait4 would include this Python process's pages (the high-water mark survives
    the fork + exec), i.e. the transformers models loaded here."""
    cmd = [exe, "bench", model, "-p", str(p), "-n", str(n), "-r", "1", "--threads", str(threads), "--json"]
    out = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M"] + cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"xllm bench failed ({out.returncode}): {out.stderr}")
    rss_kb = [int(l.split()[1]) for l in out.stderr.splitlines() if l.startswith("maxrss_kb ")][-1]
    j = json.loads(out.stdout)
    return j["decode_tokens_per_second"], j["prefill_tokens_per_second"], rss_kb * 1024


class Transformers:
    def __init__(self, path, dtype_name, threads):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype_name), use_mamba_kernels=False).eval()

    def round(self, p, n):
        torch = self.torch
        ids = torch.tensor([prompt_ids(self.model.config.vocab_size, p)])
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model(ids, use_cache=True)
            pre = p / (time.perf_counter() - t)
            past = out.past_key_values
            tok = torch.tensor([[100]])
            t = time.perf_counter()
            for _ in range(n):
                out = self.model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
            dec = n / (time.perf_counter() - t)
        return dec, pre


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, ".dev", "nemotron_synthetic"))
    ap.add_argument("--xllm", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "xllm"))
    ap.add_argument("-p", type=int, default=64)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtypes", default="bfloat16,float32")
    a = ap.parse_args()
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(a.model, "*.safetensors")))
    print(f"checkpoint {size / 2**20:.1f} MiB; threads {a.threads}; pp{a.p} tg{a.n}; {a.rounds} rounds")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    peers = {dt: Transformers(a.model, dt, a.threads) for dt in a.dtypes.split(",")}
    for peer in peers.values():
        peer.round(a.p, 2)  # warm-up
    ours, theirs, rss = [], {dt: [] for dt in peers}, []
    for r in range(a.rounds):
        dec, pre, peak = xllm_round(a.xllm, a.model, a.p, a.n, a.threads)
        ours.append((dec, pre))
        rss.append(peak)
        line = f"round {r + 1}: xllm tg {dec:.2f} pp {pre:.1f} rss {peak / 2**20:.0f} MiB"
        for dt, peer in peers.items():
            d, p = peer.round(a.p, a.n)
            theirs[dt].append((d, p))
            line += f" | transformers {dt} tg {d:.2f} pp {p:.1f}"
        print(line, flush=True)
    med = lambda xs, i: statistics.median(x[i] for x in xs)
    print()
    print("| engine | decode tok/s | prefill tok/s | decode ratio (xllm / peer) |")
    print("| --- | --: | --: | --: |")
    print(f"| xllm (bf16 kept) | {med(ours, 0):.2f} | {med(ours, 1):.1f} | |")
    for dt, xs in theirs.items():
        print(f"| transformers {dt} | {med(xs, 0):.2f} | {med(xs, 1):.1f} | {med(ours, 0) / med(xs, 0):.2f}x |")
    peak = max(rss)
    print(f"\nxllm peak RSS {peak / 2**20:.1f} MiB = {peak / size:.3f}x the checkpoint")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
