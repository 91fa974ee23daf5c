#!/usr/bin/env python3
"""Tiny random BitNet b1.58 checkpoints (transformers' `bitnet`, `BitNetForCausalLM`) with reference
logits computed by transformers itself (f32), in both layouts transformers reads:

  tests/fixtures/tiny-bitnet-packed/  packed ternary weights: uint8 [out/4, in] (2 bits per weight,
      rows r, r+out/4, r+2·out/4, r+3·out/4 in bits 0-1, 2-3, 4-5, 6-7, level = weight + 1) and a
      `weight_scale` [1] per BitLinear; quantization_config linear_class "bitlinear" (y / scale).
  tests/fixtures/tiny-bitnet-bf16/    bf16 master weights; quantization_config linear_class
      "autobitlinear", quantization_mode "online" (absmean ternarization at every forward);
      embedding and norms f32 (see below).

Each folder: config.json, model.safetensors, tokenizer.json (small byte-level BPE),
reference.safetensors (input_ids [T] i64, logits [T, vocab] f32), reference.json.
Widths are multiples of 256 so every BitLinear fits TQ1_0/TQ2_0 blocks.

    TORCHDYNAMO_DISABLE=1 $XLLM_PEERS/venv/bin/python scripts/make_bitnet_fixtures.py
"""
import json
import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # BitLinear's @torch.compile needs a C compiler

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import pack_weights

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
    "the capital of Germany. Rivers flow to the sea; mountains rise toward the sky. 12345 + 678 = 13023."
)
VOCAB = 320
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return tok


def base_config():
    return BitNetConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def random_master(config):
    """A plain (unquantized) BitNet with random weights and perturbed norms."""
    torch.manual_seed(16)
    model = BitNetForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".weight") and p.dim() == 2:
                # Layers write small updates into the residual stream (as trained models do, and
                # GPT-2-style inits aim for): then one int8 activation landing on the other side
                # of a rounding tie moves the logits by ~1e-4, not ~1e-2 as with unit-gain
                # random layers, and a float-order difference cannot hide a real one. Embeddings
                # at unit scale (nn.Embedding's default) carry the stream.
                small = name.endswith(("o_proj.weight", "down_proj.weight"))
                embedding = "embed_tokens" in name
                p.copy_(torch.randn_like(p) * (0.002 if small else 1.0 if embedding else 0.05))
    return model


def is_bitlinear(name):
    return any(f".{l}." in name for l in LINEARS) and name.endswith(".weight")


def write(out, config, state, tok, ids):
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tok.save(os.path.join(out, "tokenizer.json"))
    # The reference is what transformers computes from the files just written (f32 compute).
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        logits = model(input_ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(1, input_ids[0, 1:, None]).mean().item()
    save_file({"input_ids": input_ids[0].to(torch.int64), "logits": logits.contiguous()},
              os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"text": TEXT, "tokens": len(ids), "mean_nll": nll, "perplexity": math.exp(nll),
                   "transformers": __import__("transformers").__version__}, f, indent=1)
    print(out, len(ids), "tokens, ppl", math.exp(nll))


def main():
    tok = make_tokenizer()
    ids = tok.encode(TEXT).ids
    master = random_master(base_config())
    state = {k: v.contiguous() for k, v in master.state_dict().items()}

    # Packed ternary (BitLinear): per-tensor absmean ternarization, as BitNet trains.
    packed = {}
    for name, w in state.items():
        if is_bitlinear(name):
            s = 1.0 / w.abs().mean().clamp(min=1e-5)
            q = (w * s).round().clamp(-1, 1).to(torch.int8)
            packed[name] = pack_weights(q.clone())
            packed[name[: -len("weight")] + "weight_scale"] = s.reshape(1).to(torch.float32)
        else:
            packed[name] = w
    config = base_config()
    config.quantization_config = {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
    }
    write(os.path.join(ROOT, "tiny-bitnet-packed"), config, packed, tok, ids)

    # bf16 master weights, ternarized online by AutoBitLinear. The embedding and the norms stay
    # f32: with bf16 embeddings *and* bf16 norm weights, many activations land exactly on a
    # rounding tie of the int8 activation quantization (127·a/b of 8-bit mantissas), so a 1e-7
    # change anywhere moves transformers' own logits by ~2 % — no reference to compare against.
    masters = {
        k: (v if ("norm" in k or "embed_tokens" in k) else v.to(torch.bfloat16)).contiguous()
        for k, v in state.items()
    }
    config = base_config()
    config.torch_dtype = "bfloat16"
    config.quantization_config = {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online",
    }
    write(os.path.join(ROOT, "tiny-bitnet-bf16"), config, masters, tok, ids)


if __name__ == "__main__":
    main()
