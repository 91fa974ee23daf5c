#!/usr/bin/env python3
"""Speed of xllm against its peers on the same machine, in one run, with ratios.

- GGUF (models/smollm2/*.gguf): `xllm bench` vs llama.cpp (llama-cpp-python), prefill of P random
  tokens and decode of N tokens one at a time, median of R repeats after a warm-up.
- safetensors (models/smollm2-st, if present): `xllm bench` vs transformers bf16 (and f32).
- Nemotron-H (`--nemotron DIR`, e.g. .dev/nemotron_synthetic from scripts/make_synthetic_nemotron.py):
  `xllm bench` vs transformers bf16 and f32 (torch path), and xllm's peak RSS against the checkpoint.
Usage: $XLLM_PEERS/venv/bin/python scripts/bench.py [--xllm target/release/xllm] [-p 128] [-n 64]
       [-r 3] [--threads 2] [--skip-transformers] [--nemotron DIR]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xllm_bench(exe, model, p, n, r, threads):
    out = subprocess.run([exe, "bench", model, "-p", str(p), "-n", str(n), "-r", str(r),
                          "--threads", str(threads), "--json"], check=True, capture_output=True, text=True)
    j = json.loads(out.stdout)
    return j["prefill_tokens_per_second"], j["decode_tokens_per_second"]


def prompt_ids(vocab, p):
    return [100 + (i * 2654435761) % (vocab - 100) for i in range(p)]


def llama_cpp_bench(gguf, p, n, r, threads):
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_ctx=p + n + 8, n_batch=max(p, 1), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    ids = prompt_ids(llm.n_vocab(), p)
    pre, dec = [], []
    for rep in range(r + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        a = p / (time.perf_counter() - t)
        tok = 100
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
        b = n / (time.perf_counter() - t)
        if rep:
            pre.append(a)
            dec.append(b)
    return statistics.median(pre), statistics.median(dec)


def transformers_bench(path, dtype_name, p, n, r, threads, **load_kwargs):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load_kwargs).eval()
    ids = torch.tensor([prompt_ids(model.config.vocab_size, p)])
    pre, dec = [], []
    with torch.inference_mode():
        for rep in range(r + 1):
            t = time.perf_counter()
            out = model(ids, use_cache=True)
            a = p / (time.perf_counter() - t)
            past = out.past_key_values
            tok = torch.tensor([[100]])
            t = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
            b = n / (time.perf_counter() - t)
            if rep:
                pre.append(a)
                dec.append(b)
    return statistics.median(pre), statistics.median(dec)


def row(name, ours, peer):
    print(f"| {name:<34} | {ours[0]:>9.1f} | {peer[0]:>9.1f} | {ours[0] / peer[0]:>5.2f}x "
          f"| {ours[1]:>8.1f} | {peer[1]:>8.1f} | {ours[1] / peer[1]:>5.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xllm", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "xllm"))
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--nemotron", help="a Nemotron-H checkpoint directory (synthetic, real widths)")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads {a.threads}; pp{a.p} tg{a.n}; median of {a.r}")
    print("| model / peer                       | xllm pp/s | peer pp/s | ratio | xllm tg/s | peer tg/s | ratio |")
    print("| ---------------------------------- | --------: | --------: | ----: | --------: | --------: | ----: |")
    gguf = sorted(glob.glob(os.path.join(ROOT, "models/smollm2/*.gguf")))
    if gguf:
        ours = xllm_bench(a.xllm, gguf[0], a.p, a.n, a.r, a.threads)
        peer = llama_cpp_bench(gguf[0], a.p, a.n, a.r, a.threads)
        row("SmolLM2 Q4_1 GGUF vs llama.cpp", ours, peer)
    st = os.path.join(ROOT, "models/smollm2-st")
    if os.path.isdir(st) and not a.skip_transformers:
        ours = xllm_bench(a.xllm, st, a.p, a.n, a.r, a.threads)
        for dt in ("bfloat16", "float32"):
            peer = transformers_bench(st, dt, a.p, a.n, a.r, a.threads)
            row(f"SmolLM2 bf16 st vs transformers {dt[:4]}", ours, peer)
    if a.nemotron:
        nemotron(a)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def checkpoint_bytes(path):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def nemotron(a):
    """xllm bench (bf16 weights kept) vs transformers on the CPU, and xllm's peak RSS."""
    proc = subprocess.Popen([a.xllm, "bench", a.nemotron, "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
                             "--threads", str(a.threads), "--json"], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, f"xllm bench failed ({status})"
    j = json.loads(out)
    ours = (j["prefill_tokens_per_second"], j["decode_tokens_per_second"])
    rss = usage.ru_maxrss * 1024
    size = checkpoint_bytes(a.nemotron)
    for dt in ("bfloat16", "float32"):
        peer = transformers_bench(a.nemotron, dt, a.p, a.n, a.r, a.threads, use_mamba_kernels=False)
        row(f"Nemotron-H synth vs transformers {dt[:4]}", ours, peer)
    print(f"xllm peak RSS {rss / 2**20:.1f} MiB = {rss / size:.2f}x the checkpoint ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
