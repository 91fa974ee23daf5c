#!/usr/bin/env python3
"""Embedding throughput: xllm vs sentence-transformers on all-MiniLM-L6-v2, same machine, same run.

1000 sentences of varied length (deterministic), 2 threads each, f32 CPU. sentence-transformers
runs `encode` with its defaults (batch 32, length-sorted batches, padded and masked); xllm runs
`xllm embed --file ... --verbose` and reports its own embed time (load excluded, tokenization
included), like the `encode` call timed for sentence-transformers. Best of --repeats runs each,
interleaved. Prints sentences/s for both and the ratio.

Usage: $XLLM_PEERS/venv/bin/python scripts/bench_embed.py [--threads 2] [--repeats 3]
       (after `cargo build --release` and scripts/get_minilm.sh)
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "minilm")
XLLM = os.path.join(ROOT, "target", "release", "xllm")

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "or has had not but it its also first one new after who their two been they more when "
    "model vector search query document token sentence language meaning retrieval index city "
    "semantic similarity batch attention layer encoder river mountain ocean forest music "
    "history science art data engine kernel thread government university season company war"
).split()


def sentences(n=1000, seed=7):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # Mostly sentence-sized inputs, some paragraphs: 4..120 words, skewed short.
        words = int(4 + rng.random() ** 2 * 116)
        s = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def run_xllm(path, threads):
    out = subprocess.run(
        [XLLM, "embed", MODEL, "--file", path, "--format", "jsonl", "--threads", str(threads), "--verbose"],
        capture_output=True, text=True, check=True,
    )
    m = re.search(r"embed duration:\s+([0-9.]+)s", out.stderr)
    if not m:
        sys.exit("xllm printed no embed duration:\n" + out.stderr)
    return float(m.group(1)), out.stdout.count("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-n", type=int, default=1000)
    args = ap.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    data = sentences(args.n)
    st = SentenceTransformer(MODEL, device="cpu")
    st.encode(data[:64])  # warm-up
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(data) + "\n")
        path = f.name
    tokens = sum(len(st.tokenize([s])["input_ids"][0]) for s in data)
    times_st, times_x, loads = [], [], []
    for _ in range(args.repeats):
        # Interleaved (A B A B) so both see the same machine load.
        loads.append(os.getloadavg()[0])
        t0 = time.perf_counter()
        st.encode(data, batch_size=32)
        times_st.append(time.perf_counter() - t0)
        secs, rows = run_xllm(path, args.threads)
        assert rows == len(data), rows
        times_x.append(secs)
    os.unlink(path)
    med_st, med_x = statistics.median(times_st), statistics.median(times_x)
    best_st, best_x = min(times_st), min(times_x)
    print(f"{len(data)} sentences, {tokens} tokens, {args.threads} threads, {args.repeats} interleaved runs, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"sentence-transformers {st_version()}: median {len(data) / med_st:8.1f} sentences/s "
          f"({med_st:.3f} s), best {len(data) / best_st:.1f}")
    print(f"xllm embed:                  median {len(data) / med_x:8.1f} sentences/s "
          f"({med_x:.3f} s), best {len(data) / best_x:.1f}")
    print(f"ratio xllm / sentence-transformers: median {med_st / med_x:.2f}x, best {best_st / best_x:.2f}x")


def st_version():
    import sentence_transformers
    import torch

    return f"{sentence_transformers.__version__} (torch {torch.__version__})"


if __name__ == "__main__":
    main()
