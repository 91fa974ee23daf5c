#!/usr/bin/env python3
"""Peak memory of `xllm quantize` on a large synthetic checkpoint (docs/performance.md, "Quantize").

Writes a llama-shaped bf16 safetensors checkpoint of about --gb GB (default 6, the issue's size) in
shards of ~2 GB with model.safetensors.index.json, hidden 2048, FFN 8192, vocab 32000, as many layers
as the size needs (tokenizer.json from tests/fixtures/tiny-llama, vocabulary padded as
convert_hf_to_gguf.py pads it). Values are random bf16 (|x| ~ 0.02), drawn once into a 64 MB pool
and read from varying offsets, so writing is disk-bound. Then runs

    /usr/bin/time -v xllm quantize DIR --type TYPE -o OUT --threads N

and prints the peak RSS ("Maximum resident set size"), wall time, source and output sizes and the
largest single tensor. The checkpoint is kept in --dir for reruns (delete it afterwards: 6 GB).

Usage: python scripts/bench_quantize_memory.py [--gb 6] [--type Q4_K_M] [--threads 2] [--dir target/quantize-memory]
Needs numpy (any Python with it; $XLLM_PEERS/venv has it).
"""
import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLLM = os.environ.get("XLLM", os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release", "xllm"))
HIDDEN, FF, VOCAB, HEADS, KV_HEADS = 2048, 8192, 32000, 16, 8


def layer_tensors(i):
    kv = HIDDEN // HEADS * KV_HEADS
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", [HIDDEN]),
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.k_proj.weight", [kv, HIDDEN]),
            (p + "self_attn.v_proj.weight", [kv, HIDDEN]),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
            (p + "post_attention_layernorm.weight", [HIDDEN]),
            (p + "mlp.gate_proj.weight", [FF, HIDDEN]),
            (p + "mlp.up_proj.weight", [FF, HIDDEN]),
            (p + "mlp.down_proj.weight", [HIDDEN, FF])]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def plan(gb):
    outer = [("model.embed_tokens.weight", [VOCAB, HIDDEN]), ("model.norm.weight", [HIDDEN]),
             ("lm_head.weight", [VOCAB, HIDDEN])]
    per_layer = sum(numel(s) for _, s in layer_tensors(0)) * 2
    fixed = sum(numel(s) for _, s in outer) * 2
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    tensors = outer[:1] + [t for i in range(layers) for t in layer_tensors(i)] + outer[1:]
    return layers, tensors


def write_checkpoint(d, gb):
    layers, tensors = plan(gb)
    marker = os.path.join(d, "complete.json")
    if os.path.exists(marker) and json.load(open(marker)).get("gb") == gb:
        return layers, tensors
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(32 << 20, dtype=np.float32) * 0.02).view(np.uint32)
    pool = ((pool + 0x7FFF + ((pool >> 16) & 1)) >> 16).astype(np.uint16)  # f32 -> bf16, round to nearest even
    ones = np.full(HIDDEN, 0x3F80, dtype=np.uint16)  # norms: 1.0
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += numel(shape) * 2
        if size >= 2e9:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    weight_map = {}
    offset = 0
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = numel(shape) * 2
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(d, fname), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, shape in shard:
                if len(shape) == 1:
                    f.write(ones.tobytes())
                    continue
                left = numel(shape)
                while left:
                    start = offset % (len(pool) // 2)
                    take = min(left, len(pool) - start)
                    f.write(pool[start:start + take].tobytes())
                    left -= take
                    offset += 7919
        print(f"wrote {fname}", flush=True)
    total = sum(numel(s) for _, s in tensors) * 2
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "intermediate_size": FF, "num_hidden_layers": layers, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.copy(os.path.join(ROOT, "tests/fixtures/tiny-llama/tokenizer.json"), d)
    with open(marker, "w") as f:
        json.dump({"gb": gb}, f)
    return layers, tensors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "quantize-memory"))
    args = ap.parse_args()
    if not os.path.exists(XLLM):
        sys.exit(f"{XLLM} missing: cargo build --release")
    src = os.path.join(args.dir, f"synthetic-{args.gb:g}gb")
    layers, tensors = write_checkpoint(src, args.gb)
    src_bytes = sum(numel(s) for _, s in tensors) * 2
    largest = max(tensors, key=lambda t: numel(t[1]))
    out = os.path.join(args.dir, f"synthetic-{args.gb:g}gb-{args.type}.gguf")
    cmd = ["/usr/bin/time", "-v", XLLM, "quantize", src, "--type", args.type, "-o", out,
           "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"xllm quantize failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", r.stderr).group(1)
    cpu_user = float(re.search(r"User time \(seconds\): ([0-9.]+)", r.stderr).group(1))
    cpu_sys = float(re.search(r"System time \(seconds\): ([0-9.]+)", r.stderr).group(1))
    out_bytes = os.path.getsize(out)
    os.remove(out)
    print(f"| source | layers | tensors | largest tensor | type | output | threads | peak RSS | wall | CPU (user+sys) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {src_bytes / 1e9:.2f} GB bf16 safetensors ({len(os.listdir(src)) - 4} shards) | {layers} | {len(tensors)} "
          f"| {largest[0]} {largest[1]} ({numel(largest[1]) * 2 / 1e6:.0f} MB bf16, {numel(largest[1]) * 4 / 1e6:.0f} MB f32) "
          f"| {args.type} | {out_bytes / 1e9:.2f} GB | {args.threads} | {rss_kb / 1024:.0f} MiB | {wall} "
          f"| {cpu_user + cpu_sys:.0f} s |")


if __name__ == "__main__":
    main()
