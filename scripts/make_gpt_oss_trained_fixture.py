#!/usr/bin/env python3
"""Makes tests/fixtures/gpt_oss_trained: the tiny gpt-oss of scripts/make_gpt_oss_fixture.py (same
config, tokenizer and checkpoint layout: MXFP4 experts, bf16 rest, two shards + index, sliding window
16, YaRN, sinks), but TRAINED on text instead of random, and the numbers transformers computes from it.

Why: a random MoE is chaotic (rounding its KV cache to bf16 already moves its perplexity by 1.4 %), so
it cannot measure KV-cache quantization quality. A trained model has smooth, confident predictions, as
real checkpoints do, so perplexity changes reflect the cache's precision, not routing noise.

Training: f32 transformers GptOssForCausalLM on CPU, AdamW, random crops of the training part of
tests/fixtures/texts/gpl3-excerpt.txt. Its last part is held out: the reference perplexity and
greedy continuations are computed on it, after quantizing the experts to MXFP4 and reloading exactly
the stored values (bf16 widened, experts dequantized) into an f32 eager-attention model.

Run: nice $XLLM_PEERS/venv/bin/python scripts/make_gpt_oss_trained_fixture.py [out_dir] [steps]
"""

import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from transformers import GptOssConfig, GptOssForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_gpt_oss_fixture as base  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures", "gpt_oss_trained")
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 120
TEXT = os.path.join(HERE, "..", "tests", "fixtures", "texts", "gpl3-excerpt.txt")
HELD_OUT_TOKENS = 400  # the evaluation text: crosses the 16-token window 25 times
# Few steps: the training text is ~6400 tokens, and beyond ~120 steps the model memorises it and
# held-out perplexity rises again (measured: 28 at step 100, 32 at step 200).
CROP, BATCH, LR = 64, 8, 3e-3


def checkpoint_of(model):
    """The trained f32 parameters in the real checkpoint layout: experts MXFP4 ([E, out, in]
    blocks/scales), everything else bf16."""
    ckpt = {}
    for name, p in model.state_dict().items():
        if "rotary" in name:
            continue
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            w = p.detach().float().numpy().transpose(0, 2, 1)  # transformers keeps [E, in, out]
            blocks, scales = base.quantize_mxfp4(np.ascontiguousarray(w))
            ckpt[name + "_blocks"] = torch.from_numpy(blocks)
            ckpt[name + "_scales"] = torch.from_numpy(scales)
        else:
            ckpt[name] = base.bf16(p.detach())
    return ckpt


@torch.no_grad()
def perplexity(model, ids):
    logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(nll.mean().item()), nll.mean().item()


def main():
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch.set_num_threads(2)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    tok = base.make_tokenizer()
    cfg, special_ids = base.write_metadata(OUT, tok)
    with open(TEXT) as f:
        all_ids = tok.encode(f.read()).ids
    train_ids, eval_ids = all_ids[:-HELD_OUT_TOKENS], all_ids[-HELD_OUT_TOKENS:]

    # Train in f32 from transformers' own initialisation.
    config = GptOssConfig.from_pretrained(OUT)
    config.quantization_config = None
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).float()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.05)
    data = torch.tensor(train_ids)
    log, start = [], time.time()
    for step in range(1, STEPS + 1):
        model.train()
        at = torch.randint(0, len(train_ids) - CROP - 1, (BATCH,))
        batch = torch.stack([data[a : a + CROP] for a in at])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == STEPS:
            model.eval()
            ppl, _ = perplexity(model, eval_ids)
            log.append({"step": step, "train_loss": loss.item(), "eval_perplexity": ppl})
            print(f"step {step}: train loss {loss.item():.3f}, held-out perplexity {ppl:.2f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    f32_ppl, _ = perplexity(model, eval_ids)

    ckpt = checkpoint_of(model)
    total = base.write_shards(OUT, ckpt, cfg["num_hidden_layers"])
    ref_model, _ = base.reference_model(OUT, ckpt)
    ppl, mean_nll = perplexity(ref_model, eval_ids)
    assert ppl < cfg["vocab_size"] / 4, f"training did not converge: held-out perplexity {ppl}"

    @torch.no_grad()
    def last_logits(seq):
        return ref_model(torch.tensor([seq])).logits[0, -1].double()

    greedy = []
    for plen in (8, 60):
        prompt = eval_ids[:plen]
        seq, margins = list(prompt), []
        for _ in range(24):
            top = torch.topk(last_logits(seq), 2)
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(int(top.indices[0]))
        greedy.append({"prompt": prompt, "continuation": seq[plen:], "margins": margins})

    ref = {
        "generator": "scripts/make_gpt_oss_trained_fixture.py",
        "transformers_dtype": "float32",
        "training": {"text": "tests/fixtures/texts/gpl3-excerpt.txt minus its last held-out tokens",
                     "train_tokens": len(train_ids), "steps": STEPS, "crop": CROP, "batch": BATCH,
                     "max_lr": LR, "log": log, "held_out_perplexity_f32_weights": f32_ppl},
        "text": tok.decode(eval_ids),
        "text_ids": eval_ids,
        "perplexity": ppl,
        "mean_nll": mean_nll,
        "greedy": greedy,
        "special_token_ids": special_ids,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"vocab {cfg['vocab_size']}, train tokens {len(train_ids)}, held-out tokens {len(eval_ids)}")
    print(f"held-out perplexity: f32 weights {f32_ppl:.4f}, stored checkpoint (MXFP4 experts, bf16) {ppl:.4f}")
    print(f"checkpoint bytes {total}")
    for g in greedy:
        print(f"prompt {len(g['prompt'])}: {tok.decode(g['continuation'])!r} min margin {min(g['margins']):.4f}")


if __name__ == "__main__":
    main()
