#!/usr/bin/env python3
"""Makes tests/fixtures/nemotron_h_{a,b}: two tiny random Nemotron-H (`model_type: nemotron_h`)
checkpoints in the layout nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 ships, and the numbers
transformers computes from them.

Layout: `backbone.embeddings`, `backbone.layers.N.{norm, mixer.*}`, `backbone.norm_f`, `lm_head`; MoE
experts stored one tensor per expert (`mixer.experts.E.{up,down}_proj.weight`), the router's
`e_score_correction_bias` in f32, everything else bf16; two shards + model.safetensors.index.json; a
config.json in the shipped spelling (`hybrid_override_pattern`, `mamba_num_heads`, ...); a BPE
tokenizer with ChatML/think special tokens; generation_config.json; chat_template.jinja.

- a: the real model's kind of pattern (`MEM*EMEM*E`: Mamba/MoE alternating, attention between), 2 Mamba
  groups of 4 heads, top-4 of 12 experts, renormalised and scaled by 2.5.
- b: another pattern with consecutive Mamba layers, a dense `-` MLP layer and attention first
  (`*MM-EM*ME`), 3 Mamba groups, conv kernel 3, top-3 of 8 experts, no renormalisation, scale 1.5.

Reference numbers (transformers' NemotronHForCausalLM, f32, torch path, the checkpoint's exact bf16
values widened), in reference.safetensors + reference.json:
- `prefill_logits [T, V]`: one forward over the whole text (all positions); perplexity from it.
- `decode_logits [T, V]`: transformers' cache: a prefill of `decode_from` tokens, then one token at a
  time (its own recurrence and conv-state update).
- `chunked_logits [T, V]`: transformers' cache fed the text in the uneven pieces `chunked_pieces`
  (its chunk scan continuing from the cached state).
- greedy continuations (32 tokens) of a few prompts with each step's top-1/top-2 margin.
- `kernel.*`: the inputs and outputs of layer 0's mixer pieces (in_proj output, conv+SiLU output, scan
  output before the gated norm, gated norm output) and of the first MoE layer (its input, router
  logits, chosen experts and weights, the routed sum, the shared expert) for the first tokens, so the
  kernels are tested against transformers piece by piece.

Run: $XLLM_PEERS/venv/bin/python scripts/make_nemotron_fixtures.py [out_root]
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
from transformers import NemotronHConfig, NemotronHForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures")

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]

CORPUS = """
The river runs past the old mill and under the stone bridge before it reaches the sea.
In the morning the fishermen mend their nets while the gulls circle above the harbour.
A small model can still learn the shape of a language if the text is long enough.
Numbers like 12, 345 and 6789 appear in reports, tables and the margins of old books.
She opened the window, looked at the rain, and decided to stay home with a cup of tea.
Every layer of the network reads the residual stream and writes a small correction back.
The committee met on Tuesday to discuss the budget, the schedule and the new library.
Mountains rise to the north; to the south the plain stretches flat toward the horizon.
State space layers carry a summary of everything they have read in a fixed amount of memory.
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

# The chat template: ChatML with an always-present system turn and the <think> switch, in the shape
# of the Nano 3 template (research notes A5), reduced to what the tiny fixture needs.
CHAT_TEMPLATE = """{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set system_message = '' -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system_message = messages[0].content -%}
{%- set messages = messages[1:] -%}
{%- endif -%}
{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if enable_thinking -%}
{{- '<|im_start|>assistant\\n<think>\\n' -}}
{%- else -%}
{{- '<|im_start|>assistant\\n<think></think>' -}}
{%- endif -%}
{%- endif -%}
"""

BASE = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "expand": 2,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "mamba_hidden_act": "silu",
    "mamba_proj_bias": False,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_logits_to_keep": 1,
    "rescale_prenorm_residual": True,
    "residual_in_fp32": False,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "time_step_floor": 0.0001,
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "torch_dtype": "bfloat16",
    "use_bias": False,
    "use_cache": True,
    "use_conv_bias": True,
    "mamba_ssm_cache_dtype": "float32",
}

FIXTURES = {
    "nemotron_h_a": dict(
        BASE,
        hidden_size=64,
        hybrid_override_pattern="MEM*EMEM*E",
        num_hidden_layers=10,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=12,
        num_experts_per_tok=4,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40,
        intermediate_size=32,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "nemotron_h_b": dict(
        BASE,
        hidden_size=48,
        hybrid_override_pattern="*MM-EM*ME",
        num_hidden_layers=9,
        mamba_num_heads=12,
        mamba_head_dim=4,
        n_groups=3,
        ssm_state_size=8,
        conv_kernel=3,
        chunk_size=8,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40,
        intermediate_size=56,
        routed_scaling_factor=1.5,
        norm_topk_prob=False,
    ),
}


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


def bf16(t):
    return t.to(torch.bfloat16)


def make_checkpoint(cfg, vocab, gen):
    """Random weights in the shipped names and dtypes; scales chosen for peaked logits."""

    def rnd(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    H = cfg["hidden_size"]
    nh, hd, ng, ds, K = (cfg[k] for k in ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel"))
    d_inner = nh * hd
    conv_dim = d_inner + 2 * ng * ds
    proj = d_inner + conv_dim + nh
    ah, akv, ahd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, I, S = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
    ckpt = {"backbone.embeddings.weight": bf16(rnd(vocab, H, std=1.0))}
    for l, kind in enumerate(cfg["hybrid_override_pattern"]):
        p = f"backbone.layers.{l}."
        ckpt[p + "norm.weight"] = bf16(1.0 + rnd(H, std=0.1))
        m = p + "mixer."
        if kind == "M":
            w = rnd(proj, H, std=0.3)
            # Small dt rows: dt = softplus(dt_raw + dt_bias) stays well above time_step_min, where
            # transformers clamps it in prefill but not in decode (so the clamp never decides).
            w[-nh:] *= 0.03
            ckpt[m + "in_proj.weight"] = bf16(w)
            ckpt[m + "conv1d.weight"] = bf16(rnd(conv_dim, 1, K, std=0.5))
            ckpt[m + "conv1d.bias"] = bf16(rnd(conv_dim, std=0.1))
            # softplus(dt_bias) in 0.05..0.95; A = -exp(A_log) in -1..-16.
            ckpt[m + "dt_bias"] = bf16(torch.log(torch.expm1(torch.rand(nh, generator=gen) * 0.9 + 0.05)))
            ckpt[m + "A_log"] = bf16(torch.log(torch.rand(nh, generator=gen) * 15 + 1))
            ckpt[m + "D"] = bf16(1.0 + rnd(nh, std=0.3))
            ckpt[m + "norm.weight"] = bf16(1.0 + rnd(d_inner, std=0.1))
            ckpt[m + "out_proj.weight"] = bf16(rnd(H, d_inner, std=0.3))
        elif kind == "*":
            ckpt[m + "q_proj.weight"] = bf16(rnd(ah * ahd, H, std=0.25))
            ckpt[m + "k_proj.weight"] = bf16(rnd(akv * ahd, H, std=0.25))
            ckpt[m + "v_proj.weight"] = bf16(rnd(akv * ahd, H, std=0.2))
            ckpt[m + "o_proj.weight"] = bf16(rnd(H, ah * ahd, std=0.15))
        elif kind == "E":
            ckpt[m + "gate.weight"] = bf16(rnd(E, H, std=0.3))
            ckpt[m + "gate.e_score_correction_bias"] = rnd(E, std=0.05).float()
            for e in range(E):
                ckpt[m + f"experts.{e}.up_proj.weight"] = bf16(rnd(I, H, std=0.3))
                ckpt[m + f"experts.{e}.down_proj.weight"] = bf16(rnd(H, I, std=0.2))
            ckpt[m + "shared_experts.up_proj.weight"] = bf16(rnd(S, H, std=0.3))
            ckpt[m + "shared_experts.down_proj.weight"] = bf16(rnd(H, S, std=0.2))
        elif kind == "-":
            ckpt[m + "up_proj.weight"] = bf16(rnd(cfg["intermediate_size"], H, std=0.3))
            ckpt[m + "down_proj.weight"] = bf16(rnd(H, cfg["intermediate_size"], std=0.2))
        else:
            raise ValueError(kind)
    ckpt["backbone.norm_f.weight"] = bf16(1.0 + rnd(H, std=0.1))
    ckpt["lm_head.weight"] = bf16(rnd(vocab, H, std=0.4))
    return ckpt


def write_shards(out, ckpt, layers):
    def shard_of(name):
        if name.startswith("backbone.layers."):
            return 0 if int(name.split(".")[2]) < layers // 2 else 1
        return 0 if name == "backbone.embeddings.weight" else 1

    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
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


def state_dict_for_transformers(model, ckpt):
    """Our checkpoint names → the module's (backbone → model, per-expert tensors stacked)."""
    prefix = "model." if hasattr(model, "model") else "backbone."
    want = model.state_dict()
    state = {}
    experts = {}
    for k, v in ckpt.items():
        name = k.replace("backbone.", prefix, 1)
        parts = name.split(".")
        if ".mixer.experts." in name:
            # model.layers.L.mixer.experts.E.up_proj.weight → model.layers.L.mixer.experts.up_proj
            e = int(parts[5])
            key = ".".join(parts[:5] + [parts[6]])
            experts.setdefault(key, {})[e] = v.float()
            continue
        state[name] = v.float()
    for key, per in experts.items():
        if key in want:
            state[key] = torch.stack([per[e] for e in sorted(per)])
        else:
            # An older transformers with per-expert modules.
            for e, w in per.items():
                state[key.replace("experts.", f"experts.{e}.") + ".weight"] = w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


def build_reference(out, ckpt):
    config = NemotronHConfig.from_pretrained(out)
    config._attn_implementation = "eager"
    model = NemotronHForCausalLM(config).to(torch.float32).eval()
    state_dict_for_transformers(model, ckpt)
    # transformers must read the shipped layout itself to the same weights.
    loaded = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys(), set(mine) ^ set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k].float()), k
    return model, config


def capture_kernels(model, config, ids, n):
    """Inputs/outputs of the first Mamba layer's pieces and the first MoE layer, first `n` tokens.

    The conv output is transformers' own `causal_conv1d_fn` applied to the captured in_proj output
    (the mixer calls that function, not a module a hook could see)."""
    from transformers.models.nemotron_h import modeling_nemotron_h as mh

    layers = model.model.layers
    pattern = config.hybrid_override_pattern
    m0 = pattern.index("M")
    e0 = pattern.index("E")
    got = {}
    mixer = layers[m0].mixer
    moe = layers[e0].mixer
    def keep(**names):
        """A forward hook storing parts of (inputs, output) under `names`; returns None (a hook
        that returns a value would replace the module's output)."""

        def hook(mod, inputs, output):
            for key, pick in names.items():
                got[key] = pick(inputs, output)

        return hook

    hooks = [
        mixer.in_proj.register_forward_hook(keep(in_proj_out=lambda i, o: o[0])),
        mixer.norm.register_forward_hook(keep(scan_out=lambda i, o: i[0][0], norm_out=lambda i, o: o[0])),
        moe.register_forward_hook(keep(moe_in=lambda i, o: i[0][0], moe_out=lambda i, o: o[0])),
        moe.gate.register_forward_hook(
            keep(router_logits=lambda i, o: o[0], topk_weights=lambda i, o: o[1], topk_indices=lambda i, o: o[2])
        ),
        moe.experts.register_forward_hook(keep(routed_out=lambda i, o: o)),
        moe.shared_experts.register_forward_hook(keep(shared_out=lambda i, o: o[0])),
    ]
    with torch.no_grad():
        model(torch.tensor([ids[:n]]))
        d_inner = config.mamba_num_heads * config.mamba_head_dim
        conv_dim = d_inner + 2 * config.n_groups * config.ssm_state_size
        xbc = got["in_proj_out"][:, d_inner : d_inner + conv_dim].T[None]  # [1, conv_dim, n]
        conv = mh.causal_conv1d_fn(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation="silu")
        got["conv_out"] = conv[0].T
    for h in hooks:
        h.remove()
    # Sort each token's chosen experts by index so the comparison does not depend on topk order.
    idx, w = got["topk_indices"], got["topk_weights"]
    order = torch.argsort(idx, dim=-1)
    got["topk_indices"] = torch.gather(idx, 1, order).to(torch.int64)
    got["topk_weights"] = torch.gather(w, 1, order)
    out = {
        f"kernel.{k}": v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in got.items()
    }
    return out, {"mamba_layer": m0, "moe_layer": e0, "tokens": n}


def main():
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert ids["<unk>"] == 0 and ids["<s>"] == 1 and ids["</s>"] == 2, ids
    text_ids = tok.encode(PPL_TEXT).ids
    assert len(text_ids) >= 150, len(text_ids)
    for seed, (name, base_cfg) in enumerate(FIXTURES.items()):
        out = os.path.join(ROOT, name)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
        cfg = dict(base_cfg, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": [2, ids["<|im_end|>"]], "pad_token_id": 0}, f, indent=2)
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<s>",
                    "eos_token": "<|im_end|>",
                    "pad_token": "<unk>",
                    "model_max_length": 8192,
                },
                f,
                indent=2,
            )
        with open(os.path.join(out, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)

        gen = torch.Generator().manual_seed(4321 + seed)
        ckpt = make_checkpoint(cfg, vocab, gen)
        total = write_shards(out, ckpt, cfg["num_hidden_layers"])
        model, config = build_reference(out, ckpt)

        with torch.no_grad():
            prefill = model(torch.tensor([text_ids])).logits[0].float()
            logp = torch.log_softmax(prefill.double(), dim=-1)
            nll = -logp[torch.arange(len(text_ids) - 1), torch.tensor(text_ids[1:])]
            ppl = math.exp(nll.mean().item())

            # transformers' own cache: a prefill, then one token at a time.
            def with_cache(pieces):
                cache, rows, at = None, [], 0
                for size in pieces:
                    o = model(torch.tensor([text_ids[at : at + size]]), cache=cache, use_cache=True)
                    cache = o.cache
                    assert o.logits.shape[1] == size, o.logits.shape
                    rows.append(o.logits[0].float())
                    at += size
                assert at == len(text_ids)
                return torch.cat(rows, 0)

            decode_from = 37
            decode = with_cache([decode_from] + [1] * (len(text_ids) - decode_from))
            # Chunked prefill (pieces shorter and longer than the scan chunk, single tokens between),
            # the same pieces tests/nemotron_parity.rs feeds.
            pieces = [5, 17, 1, 30, 3, 9, 1, 1, 40]
            pieces.append(len(text_ids) - sum(pieces))
            chunked = with_cache(pieces)
            # transformers agrees with itself across the three ways (its decode does not clamp dt
            # below time_step_min as its prefill does; the difference is far below this bound).
            for what, other in (("decode", decode), ("chunked", chunked)):
                rel = ((other - prefill).abs().max(-1).values / prefill.abs().max(-1).values).max().item()
                print(f"  transformers {what} vs its prefill: max relative difference {rel:.2e}")
                assert rel < 1e-4, f"transformers' {what} differs from its prefill by {rel}"

            # Greedy continuations through transformers' cache (checked above to agree with its
            # one-shot prefill).
            greedy = []
            for plen in (5, 40, 120):
                prompt = text_ids[:plen]
                o = model(torch.tensor([prompt]), use_cache=True)
                cache, last = o.cache, o.logits[0, -1].double()
                seq, margins = list(prompt), []
                for _ in range(32):
                    top = torch.topk(last, 2)
                    margins.append(float(top.values[0] - top.values[1]))
                    seq.append(int(top.indices[0]))
                    o = model(torch.tensor([[seq[-1]]]), cache=cache, use_cache=True)
                    cache, last = o.cache, o.logits[0, -1].double()
                greedy.append({"prompt": prompt, "continuation": seq[plen:], "margins": margins})

        kernels, kernel_info = capture_kernels(model, config, text_ids, 40)
        tensors = {
            "prefill_logits": prefill.contiguous(),
            "decode_logits": decode.contiguous(),
            "chunked_logits": chunked.contiguous(),
            **kernels,
        }
        save_file(tensors, os.path.join(out, "reference.safetensors"))
        ref = {
            "generator": "scripts/make_nemotron_fixtures.py",
            "transformers_dtype": "float32",
            "text": PPL_TEXT,
            "text_ids": text_ids,
            "perplexity": ppl,
            "mean_nll": nll.mean().item(),
            "decode_from": decode_from,
            "chunked_pieces": pieces,
            "greedy": greedy,
            "kernels": kernel_info,
            "special_token_ids": ids,
            "checkpoint_bytes": total,
        }
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref, f)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: vocab {vocab}, text tokens {len(text_ids)}, perplexity {ppl:.4f}, checkpoint {total} B, folder {size} B")
        for g in greedy:
            print(f"  prompt {len(g['prompt'])}: min margin {min(g['margins']):.4f}")


if __name__ == "__main__":
    main()
