#!/usr/bin/env python3
"""Makes tests/fixtures/gpt_oss_tiny: a tiny random gpt-oss in the real checkpoint layout, and the
numbers transformers computes from it.

Layout as openai/gpt-oss-20b ships it: experts as MXFP4 `*_blocks` (u8 [E, out, in/32, 16]) and
`*_scales` (u8 E8M0 [E, out, in/32]), everything else bf16, two shards + model.safetensors.index.json,
config.json with quantization_config.quant_method = "mxfp4", layer_types, YaRN rope_scaling, a small
sliding window; a BPE tokenizer.json with the harmony special tokens; chat_template.jinja.

Reference numbers: transformers' GptOssForCausalLM in f32 (eager attention) with exactly the weights
the checkpoint holds (experts dequantized from the stored blocks/scales, bf16 values widened):
perplexity of a text, logits at a few positions, greedy continuations of prompts that cross the
sliding window, with each step's top-1/top-2 margin.

Run: $XLLM_PEERS/venv/bin/python scripts/make_gpt_oss_fixture.py [out_dir]
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GptOssConfig, GptOssForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures", "gpt_oss_tiny")

SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
]

CORPUS = """
The river runs past the old mill and under the stone bridge before it reaches the sea.
In the morning the fishermen mend their nets while the gulls circle above the harbour.
A small model can still learn the shape of a language if the text is long enough.
Numbers like 12, 345 and 6789 appear in reports, tables and the margins of old books.
She opened the window, looked at the rain, and decided to stay home with a cup of tea.
Every layer of the network reads the residual stream and writes a small correction back.
The committee met on Tuesday to discuss the budget, the schedule and the new library.
Mountains rise to the north; to the south the plain stretches flat toward the horizon.
Questions about attention, memory and speed come up whenever people run large models.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
"""

PPL_TEXT = (
    "When the tide turned, the boats came back to the harbour one by one, and the people on the "
    "bridge counted them: twelve in the morning, seven at noon, and the last three just before the "
    "rain. The committee wrote the numbers in the margins of the report, next to the notes about "
    "the library and the budget, while the river kept running past the old mill toward the sea. "
    "Every evening the fishermen told the same story about the fox, the dog and the cat, and every "
    "evening the children asked how a small model could learn the shape of a language."
)

CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "experts_per_token": 4,
    "num_experts_per_tok": 4,
    "num_local_experts": 8,
    "head_dim": 24,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 96,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 16,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
}

FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS, PPL_TEXT[:200]], trainer)
    return tok


def quantize_mxfp4(w):
    """w [E, out, in] f32 → (blocks u8 [E, out, in/32, 16], scales u8 [E, out, in/32])."""
    e, o, i = w.shape
    g = w.reshape(e, o, i // 32, 32)
    amax = np.abs(g).max(axis=-1)
    # Smallest power of two that brings the block's largest magnitude to ≤ 6.
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    scaled = g / np.ldexp(1.0, exp)[..., None]
    # Nearest E2M1 code (ties to the lower code index, i.e. toward zero magnitude).
    dist = np.abs(scaled[..., None] - FP4[None, None, None, None, :])
    codes = dist.argmin(axis=-1).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (exp + 127).astype(np.uint8)
    return blocks, scales


def dequantize_mxfp4(blocks, scales):
    lo = FP4[blocks & 15]
    hi = FP4[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.ldexp(1.0, scales.astype(np.int32) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], -1)


def bf16(t):
    return t.to(torch.bfloat16)


def write_metadata(out, tok):
    """Writes tokenizer, config (vocab and special ids from `tok`), generation and tokenizer configs, chat
    template; returns (config dict, special token ids)."""
    vocab = tok.get_vocab_size()
    cfg = dict(CONFIG)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    cfg.update(vocab_size=vocab, eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"])
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(
            {
                "bos_token_id": ids["<|startoftext|>"],
                "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
                "pad_token_id": ids["<|endoftext|>"],
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|return|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 131072,
            },
            f,
            indent=2,
        )
    shutil.copy(os.path.join(HERE, "gpt_oss_harmony.jinja"), os.path.join(out, "chat_template.jinja"))
    return cfg, ids


def write_shards(out, ckpt, L):
    """Two shards + index, the first holding the embedding and the first half of the layers; returns the
    checkpoint's byte size."""
    def shard_of(name):
        if name.startswith("model.layers."):
            return 0 if int(name.split(".")[2]) < L // 2 else 1
        return 0 if name == "model.embed_tokens.weight" else 1

    files = ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    weight_map, total = {}, 0
    for s, fname in enumerate(files):
        part = {k: v.contiguous() for k, v in ckpt.items() if shard_of(k) == s}
        save_file(part, os.path.join(out, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return total


def reference_model(out, ckpt):
    """The reference model: f32, eager attention, the checkpoint's exact values (experts dequantized
    from the stored MXFP4 blocks/scales, bf16 widened)."""
    config = GptOssConfig.from_pretrained(out)
    config.quantization_config = None
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).to(torch.float32).eval()
    state = {}
    for k, v in ckpt.items():
        if k.endswith("_blocks"):
            base = k[: -len("_blocks")]
            w = dequantize_mxfp4(v.numpy(), ckpt[base + "_scales"].numpy())  # [E, out, in]
            state[base] = torch.from_numpy(np.ascontiguousarray(w.transpose(0, 2, 1))).float()
        elif k.endswith("_scales"):
            continue
        else:
            state[k] = v.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model, config


def main():
    torch.manual_seed(1234)
    np.random.seed(1234)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    tok = make_tokenizer()
    cfg, ids = write_metadata(OUT, tok)
    vocab = cfg["vocab_size"]

    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    L = cfg["num_hidden_layers"]

    def rnd(*shape, std):
        return torch.randn(*shape) * std

    # Checkpoint tensors. Scales are chosen so the tiny model has peaked, decisive logits.
    ckpt = {"model.embed_tokens.weight": bf16(rnd(vocab, H, std=1.0))}
    for l in range(L):
        p = f"model.layers.{l}."
        ckpt[p + "input_layernorm.weight"] = bf16(1.0 + rnd(H, std=0.1))
        ckpt[p + "post_attention_layernorm.weight"] = bf16(1.0 + rnd(H, std=0.1))
        ckpt[p + "self_attn.q_proj.weight"] = bf16(rnd(nh * hd, H, std=0.25))
        ckpt[p + "self_attn.q_proj.bias"] = bf16(rnd(nh * hd, std=0.1))
        ckpt[p + "self_attn.k_proj.weight"] = bf16(rnd(nkv * hd, H, std=0.25))
        ckpt[p + "self_attn.k_proj.bias"] = bf16(rnd(nkv * hd, std=0.1))
        ckpt[p + "self_attn.v_proj.weight"] = bf16(rnd(nkv * hd, H, std=0.2))
        ckpt[p + "self_attn.v_proj.bias"] = bf16(rnd(nkv * hd, std=0.1))
        ckpt[p + "self_attn.o_proj.weight"] = bf16(rnd(H, nh * hd, std=0.15))
        ckpt[p + "self_attn.o_proj.bias"] = bf16(rnd(H, std=0.1))
        ckpt[p + "self_attn.sinks"] = bf16(rnd(nh, std=1.0))
        ckpt[p + "mlp.router.weight"] = bf16(rnd(E, H, std=0.3))
        ckpt[p + "mlp.router.bias"] = bf16(rnd(E, std=0.3))
        # Experts in the checkpoint's [E, out, in] orientation, quantized here.
        gu = np.random.randn(E, 2 * I, H).astype(np.float32) * 0.25
        dn = np.random.randn(E, H, I).astype(np.float32) * 0.15
        for name, w in (("gate_up_proj", gu), ("down_proj", dn)):
            blocks, scales = quantize_mxfp4(w)
            ckpt[p + f"mlp.experts.{name}_blocks"] = torch.from_numpy(blocks)
            ckpt[p + f"mlp.experts.{name}_scales"] = torch.from_numpy(scales)
        ckpt[p + "mlp.experts.gate_up_proj_bias"] = bf16(rnd(E, 2 * I, std=0.2))
        ckpt[p + "mlp.experts.down_proj_bias"] = bf16(rnd(E, H, std=0.2))
    ckpt["model.norm.weight"] = bf16(1.0 + rnd(H, std=0.1))
    ckpt["lm_head.weight"] = bf16(rnd(vocab, H, std=0.4))

    total = write_shards(OUT, ckpt, L)

    model, config = reference_model(OUT, ckpt)

    # Our own YaRN formula must agree with what transformers built (catches config reading drift).
    rp = config.rope_parameters
    assert rp["rope_type"] == "yarn" and rp.get("truncate") is False, rp
    inv = model.model.rotary_emb.inv_freq.double().numpy()
    base, factor, dim = 150000.0, 32.0, hd
    pos = base ** (np.arange(0, dim, 2) / dim)
    corr = lambda r: dim * math.log(4096 / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(corr(32.0), 0), min(corr(1.0), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    mine = (1 / (factor * pos)) * ramp + (1 / pos) * (1 - ramp)
    assert np.allclose(inv, mine, rtol=1e-6), (inv, mine)
    assert abs(model.model.rotary_emb.attention_scaling - (0.1 * math.log(factor) + 1)) < 1e-9

    @torch.no_grad()
    def logits_of(ids):
        return model(torch.tensor([ids])).logits[0].double()

    text_ids = tok.encode(PPL_TEXT).ids
    assert len(text_ids) >= 150, len(text_ids)
    lg = logits_of(text_ids)
    logp = torch.log_softmax(lg, dim=-1)
    nll = -logp[torch.arange(len(text_ids) - 1), torch.tensor(text_ids[1:])]
    ppl = math.exp(nll.mean().item())
    probe = [0, 15, 16, 17, 40, len(text_ids) - 1]

    greedy = []
    for plen in (6, 40, 170):
        prompt = text_ids[:plen]
        seq, margins = list(prompt), []
        for _ in range(32):
            last = logits_of(seq)[-1]
            top = torch.topk(last, 2)
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(int(top.indices[0]))
        greedy.append({"prompt": prompt, "continuation": seq[plen:], "margins": margins})

    ref = {
        "generator": "scripts/make_gpt_oss_fixture.py",
        "transformers_dtype": "float32",
        "text": PPL_TEXT,
        "text_ids": text_ids,
        "perplexity": ppl,
        "mean_nll": nll.mean().item(),
        "logits_at": {str(p): [float(x) for x in lg[p]] for p in probe},
        "greedy": greedy,
        "special_token_ids": ids,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"vocab {vocab}, text tokens {len(text_ids)}, perplexity {ppl:.4f}, checkpoint bytes {total}")
    for g in greedy:
        print(f"prompt {len(g['prompt'])}: min margin {min(g['margins']):.4f}")


if __name__ == "__main__":
    main()
