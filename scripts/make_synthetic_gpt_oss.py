#!/usr/bin/env python3
"""Makes a larger random gpt-oss checkpoint (~1 GB of MXFP4 experts, gpt-oss-20b layer shapes) for
memory and speed checks. Not committed: written to .dev/gpt_oss_synthetic by default.

Same layout as the real checkpoint (see make_gpt_oss_fixture.py) with hidden 2880, intermediate 2880,
64 heads × 64, 8 KV heads, and fewer layers/experts so it stays near 1 GB. Values are random (the
model is not meant to say anything): expert codes uniform, scales 2^-7..2^-4, bf16 weights small.
Needs numpy, torch (bf16) and safetensors.

Run: $XLLM_PEERS/venv/bin/python scripts/make_synthetic_gpt_oss.py [out_dir] [layers] [experts]
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", ".dev", "gpt_oss_synthetic")
LAYERS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
EXPERTS = int(sys.argv[3]) if len(sys.argv) > 3 else 24
H = I = 2880
NH, NKV, HD = 64, 8, 64
VOCAB = 2048

rng = np.random.default_rng(7)


def bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)


def normal(*shape, std):
    return (rng.standard_normal(shape, dtype=np.float32) * std)


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "num_local_experts": EXPERTS,
        "head_dim": HD,
        "hidden_size": H,
        "intermediate_size": I,
        "initial_context_length": 4096,
        "layer_types": ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(LAYERS)],
        "max_position_embeddings": 131072,
        "num_attention_heads": NH,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": NKV,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
        "eos_token_id": 0,
        "quantization_config": {"quant_method": "mxfp4"},
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    shards = [{}, {}]

    def put(shard, name, arr, is_bf16=False):
        shards[shard][name] = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr)

    put(0, "model.embed_tokens.weight", bf16(normal(VOCAB, H, std=1.0)), True)
    for l in range(LAYERS):
        s = 0 if l < (LAYERS + 1) // 2 else 1
        p = f"model.layers.{l}."
        put(s, p + "input_layernorm.weight", bf16(np.ones(H)), True)
        put(s, p + "post_attention_layernorm.weight", bf16(np.ones(H)), True)
        for proj, out, inp in (("q", NH * HD, H), ("k", NKV * HD, H), ("v", NKV * HD, H), ("o", H, NH * HD)):
            put(s, p + f"self_attn.{proj}_proj.weight", bf16(normal(out, inp, std=0.02)), True)
            put(s, p + f"self_attn.{proj}_proj.bias", bf16(normal(out, std=0.02)), True)
        put(s, p + "self_attn.sinks", bf16(normal(NH, std=1.0)), True)
        put(s, p + "mlp.router.weight", bf16(normal(EXPERTS, H, std=0.05)), True)
        put(s, p + "mlp.router.bias", bf16(normal(EXPERTS, std=0.1)), True)
        for name, out, inp in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            put(s, p + f"mlp.experts.{name}_blocks",
                rng.integers(0, 256, size=(EXPERTS, out, inp // 32, 16), dtype=np.uint8))
            put(s, p + f"mlp.experts.{name}_scales",
                rng.integers(120, 124, size=(EXPERTS, out, inp // 32), dtype=np.uint8))
            put(s, p + f"mlp.experts.{name}_bias", bf16(normal(EXPERTS, out, std=0.02)), True)
    put(1, "model.norm.weight", bf16(np.ones(H)), True)
    put(1, "lm_head.weight", bf16(normal(VOCAB, H, std=0.02)), True)

    files = [f"model-0000{i}-of-00001.safetensors" for i in range(2)]
    weight_map, total = {}, 0
    for i, (fname, tensors) in enumerate(zip(files, shards)):
        path = os.path.join(OUT, fname)
        save_file(tensors, path, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(OUT, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    experts = sum(v.numel() for s in shards for k, v in s.items() if k.endswith(("_blocks", "_scales")))
    print(f"wrote {OUT}: {total / 1e9:.3f} GB of tensors, {experts / 1e9:.3f} GB MXFP4 experts")


if __name__ == "__main__":
    main()
