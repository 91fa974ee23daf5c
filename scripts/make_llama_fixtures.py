#!/usr/bin/env python3
"""Tiny random Llama-family checkpoints with reference outputs computed by transformers (f32).

Writes tests/fixtures/<name>/ for llama (GQA, llama3 RoPE, untied head, attention bias), qwen3
(q/k norm, YaRN, tied embeddings) and qwen2 (q/k/v bias, linear RoPE, sliding window):
  config.json, model.safetensors, tokenizer.json (a small byte-level BPE trained on the text),
  reference.safetensors  input_ids [T] (i64), logits [T, vocab] (f32)
  reference.json         the text, its token count, mean NLL and perplexity (no BOS added)
Run with the reference env: $XLLM_PEERS/venv/bin/python scripts/make_llama_fixtures.py
"""
import json
import math
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
    "the capital of Germany. Rivers flow to the sea; mountains rise toward the sky. 12345 + 678 = 13023."
)
VOCAB = 320

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)

MODELS = {
    "tiny-llama": dict(
        model_type="llama", attention_bias=True, tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "tiny-qwen3": dict(
        model_type="qwen3", head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    ),
}


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


def main():
    torch.manual_seed(0)
    tok = make_tokenizer()
    ids = tok.encode(TEXT).ids
    for name, extra in MODELS.items():
        out = os.path.join(ROOT, name)
        os.makedirs(out, exist_ok=True)
        model_type = extra.pop("model_type")
        config = AutoConfig.for_model(model_type, **COMMON, **extra)
        torch.manual_seed(sum(map(ord, name)))
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
        # Random init keeps norms at 1 and biases at 0; perturb them so those paths are tested.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname or pname.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(out)
        tok.save(os.path.join(out, "tokenizer.json"))
        with torch.no_grad():
            input_ids = torch.tensor([ids])
            logits = model(input_ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -logp.gather(1, input_ids[0, 1:, None]).mean().item()
        save_file({"input_ids": input_ids[0].to(torch.int64), "logits": logits.contiguous()},
                  os.path.join(out, "reference.safetensors"))
        with open(os.path.join(out, "text.txt"), "w") as f:
            f.write(TEXT)
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump({"text": TEXT, "tokens": len(ids), "scored_tokens": len(ids) - 1,
                       "mean_nll": nll, "perplexity": math.exp(nll),
                       "transformers": __import__("transformers").__version__}, f, indent=1)
        print(name, len(ids), "tokens, ppl", math.exp(nll))


if __name__ == "__main__":
    main()
