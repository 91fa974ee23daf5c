#!/usr/bin/env python3
"""Makes a random Nemotron-H checkpoint with Nemotron 3 Nano's real layer widths and fewer layers and
experts (~1 GB bf16), for memory and speed checks. Not committed: written to
.dev/nemotron_synthetic by default.

Widths as nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16: hidden 2688; Mamba2 64 heads × 64, 8 groups,
state 128, conv 4; attention 32 heads / 2 KV heads × 128; experts 1856 wide (top-6), shared expert
3712. Layers `MEM*EM` by default, 16 experts, vocab 4096. Values are random and small (the model is
not meant to say anything). Layout and names as the real checkpoint (see make_nemotron_fixtures.py).

Run: $XLLM_PEERS/venv/bin/python scripts/make_synthetic_nemotron.py [out_dir] [pattern] [experts]
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", ".dev", "nemotron_synthetic")
PATTERN = sys.argv[2] if len(sys.argv) > 2 else "MEM*EM"
EXPERTS = int(sys.argv[3]) if len(sys.argv) > 3 else 16
H = 2688
NH, HD, NG, DS, K = 64, 64, 8, 128, 4
AH, AKV, AHD = 32, 2, 128
I, S = 1856, 3712
VOCAB = 4096

rng = np.random.default_rng(11)


def bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)


def normal(*shape, std):
    return rng.standard_normal(shape, dtype=np.float32) * std


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": VOCAB,
        "hidden_size": H,
        "num_hidden_layers": len(PATTERN),
        "hybrid_override_pattern": PATTERN,
        "mamba_num_heads": NH,
        "mamba_head_dim": HD,
        "n_groups": NG,
        "ssm_state_size": DS,
        "conv_kernel": K,
        "chunk_size": 128,
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_hidden_act": "silu",
        "num_attention_heads": AH,
        "num_key_value_heads": AKV,
        "head_dim": AHD,
        "attention_bias": False,
        "n_routed_experts": EXPERTS,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": I,
        "moe_shared_expert_intermediate_size": S,
        "intermediate_size": I,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "time_step_min": 0.001,
        "use_mamba_kernels": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    d_inner = NH * HD
    conv_dim = d_inner + 2 * NG * DS
    proj = d_inner + conv_dim + NH
    shards = [{}, {}]
    shards[0]["backbone.embeddings.weight"] = bf16(normal(VOCAB, H, std=1.0))
    for l, kind in enumerate(PATTERN):
        s = 0 if l < (len(PATTERN) + 1) // 2 else 1
        p = f"backbone.layers.{l}."
        m = p + "mixer."
        put = shards[s].__setitem__
        put(p + "norm.weight", bf16(np.ones(H)))
        if kind == "M":
            put(m + "in_proj.weight", bf16(normal(proj, H, std=0.02)))
            put(m + "conv1d.weight", bf16(normal(conv_dim, 1, K, std=0.3)))
            put(m + "conv1d.bias", bf16(normal(conv_dim, std=0.02)))
            put(m + "dt_bias", bf16(normal(NH, std=0.5) - 3.0))
            put(m + "A_log", bf16(np.log(rng.uniform(1, 16, NH))))
            put(m + "D", bf16(np.ones(NH)))
            put(m + "norm.weight", bf16(np.ones(d_inner)))
            put(m + "out_proj.weight", bf16(normal(H, d_inner, std=0.02)))
        elif kind == "*":
            for name, out, inp in (("q", AH * AHD, H), ("k", AKV * AHD, H), ("v", AKV * AHD, H), ("o", H, AH * AHD)):
                put(m + f"{name}_proj.weight", bf16(normal(out, inp, std=0.02)))
        elif kind == "E":
            put(m + "gate.weight", bf16(normal(EXPERTS, H, std=0.05)))
            put(m + "gate.e_score_correction_bias", torch.from_numpy(normal(EXPERTS, std=0.01)))
            for e in range(EXPERTS):
                put(m + f"experts.{e}.up_proj.weight", bf16(normal(I, H, std=0.02)))
                put(m + f"experts.{e}.down_proj.weight", bf16(normal(H, I, std=0.02)))
            put(m + "shared_experts.up_proj.weight", bf16(normal(S, H, std=0.02)))
            put(m + "shared_experts.down_proj.weight", bf16(normal(H, S, std=0.02)))
        else:
            raise SystemExit(f"pattern letter {kind!r}: use M, E or *")
    shards[1]["backbone.norm_f.weight"] = bf16(np.ones(H))
    shards[1]["lm_head.weight"] = bf16(normal(VOCAB, H, std=0.02))
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map, total = {}, 0
    for fname, tensors in zip(files, shards):
        save_file(tensors, os.path.join(OUT, fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(OUT, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    # The tiny fixture's tokenizer and chat template (ids above its vocabulary never occur in the
    # benchmarks' prompts' text; `xllm bench` feeds ids directly).
    fixture = os.path.join(HERE, "..", "tests", "fixtures", "nemotron_h_a")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(os.path.join(fixture, name), os.path.join(OUT, name))
    print(f"wrote {OUT}: {total / 1e9:.3f} GB of tensors, pattern {PATTERN}, {EXPERTS} experts")


if __name__ == "__main__":
    main()
