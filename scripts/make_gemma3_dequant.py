#!/usr/bin/env python3
"""Gemma 3 270M Q4_K_M dequantized to a transformers checkpoint, and transformers' f32 logits on it:
the reference tests/gemma3_dequant.rs checks our safetensors `gemma3_text` path against.

    scripts/get_gemma3.sh
    XLLM_PEERS=... $XLLM_PEERS/venv/bin/python scripts/make_gemma3_dequant.py

Reads models/gemma3/gemma-3-270m-q4_k_m.gguf with gguf-py (its own reference dequantizers),
undoes what llama.cpp's converter did (tensor names; Gemma's RMSNorm weights are stored as
`1 + w`, so 1 is subtracted back; no q/k permutation for Gemma), and writes
models/gemma3-dequant/{config.json, model.safetensors (f32)}. Then transformers'
Gemma3ForCausalLM runs in f32 (eager attention) on token ids from tests/fixtures/gemma3/ and on a
600-token sequence (longer than the 512-token sliding window), and the logits of chosen
positions are stored: reference.json (ids, positions, top-5) + reference_logits.f32 (raw
little-endian rows, vocab wide). Nothing here is committed (models/ is ignored; ~1.1 GB).
Needs the peer venv (torch, transformers, safetensors, numpy) and gguf-py from llama.cpp.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers"))
sys.path.insert(0, os.path.join(PEERS, "llama.cpp", "src", "gguf-py"))
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

SRC = os.path.join(ROOT, "models/gemma3/gemma-3-270m-q4_k_m.gguf")
DEST = os.path.join(ROOT, "models/gemma3-dequant")

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    base = name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    _, layer, role = base.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[role]}.weight"


def field(r, key):
    return r.fields[key].contents()


def convert():
    r = gguf.GGUFReader(SRC)
    tensors = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        name = hf_name(t.name)
        if t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        tensors[name] = np.ascontiguousarray(w)
    a = "gemma3"
    layers = int(field(r, f"{a}.block_count"))
    window = int(field(r, f"{a}.attention.sliding_window"))
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": int(field(r, f"{a}.embedding_length")),
        "intermediate_size": int(field(r, f"{a}.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(field(r, f"{a}.attention.head_count")),
        "num_key_value_heads": int(field(r, f"{a}.attention.head_count_kv")),
        "head_dim": int(field(r, f"{a}.attention.key_length")),
        "query_pre_attn_scalar": int(field(r, f"{a}.attention.key_length")),
        "max_position_embeddings": int(field(r, f"{a}.context_length")),
        "rms_norm_eps": float(field(r, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, f"{a}.rope.freq_base")),
        "rope_local_base_freq": 10000.0,
        "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    os.makedirs(DEST, exist_ok=True)
    with open(os.path.join(DEST, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(tensors, os.path.join(DEST, "model.safetensors"))
    print("wrote", DEST, len(tensors), "tensors")


def reference():
    from transformers import Gemma3ForCausalLM
    torch.manual_seed(0)
    model = Gemma3ForCausalLM.from_pretrained(DEST, torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    fixture = json.load(open(os.path.join(ROOT, "tests/fixtures/gemma3/reference.json")))
    cases = [{"ids": c["prompt_ids"], "positions": [len(c["prompt_ids"]) - 1]}
             for c in fixture["greedy"][:2]]
    # Past the 512-token sliding window: ids from a fixed stream inside the vocabulary (no text
    # needed: the model is compared to itself as transformers computes it).
    rng = np.random.default_rng(7)
    long_ids = [2] + [int(x) for x in rng.integers(100, 20000, 599)]
    cases.append({"ids": long_ids, "positions": [0, 300, 511, 512, 599]})
    rows = []
    with torch.no_grad():
        for c in cases:
            logits = model(torch.tensor([c["ids"]])).logits[0]
            c["top5"] = []
            for p in c["positions"]:
                row = logits[p].float().numpy()
                rows.append(row)
                c["top5"].append([int(i) for i in np.argsort(-row)[:5]])
    np.stack(rows).astype("<f4").tofile(os.path.join(DEST, "reference_logits.f32"))
    out = {"source": "transformers Gemma3ForCausalLM, f32, eager attention, on " +
                     "models/gemma3-dequant (scripts/make_gemma3_dequant.py)",
           "vocab": int(rows[0].shape[0]), "cases": cases}
    with open(os.path.join(DEST, "reference.json"), "w") as f:
        json.dump(out, f)
    print("wrote reference for", sum(len(c["positions"]) for c in cases), "rows")


if __name__ == "__main__":
    if not os.path.isfile(os.path.join(DEST, "model.safetensors")):
        convert()
    reference()
