#!/usr/bin/env python3
"""Reference numbers from llama.cpp (llama-cpp-python) for SmolLM2-135M-Instruct Q4_1 GGUF:

- tests/fixtures/smollm2_tokens.json: token ids llama.cpp gives for a few texts (our GGUF
  tokenizer must match them), and its greedy continuation of a raw prompt;
- tests/fixtures/smollm2_ppl.json: perplexity of tests/fixtures/ppl_text.txt over the same tokens
  (no BOS, context = whole text), computed from llama.cpp's logits in float64;
  and, when models/smollm2-st exists (scripts/convert_smollm2_safetensors.py), the same for
  transformers f32 on the safetensors copy.
Usage: $XLLM_PEERS/venv/bin/python scripts/make_smollm2_reference.py
"""
import glob
import json
import math
import os

import numpy as np
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TEXTS = [
    "Hello world",
    "What is the capital of France? 12345 apples, 3.14159!",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\n\n\ttabs and newlines\r\n",
    "Ünïcödé — “quotes” 日本語 emojis 🤗🚀",
    "def f(x):\n    return x ** 2  # comment",
]


def main():
    gguf = glob.glob(os.path.join(ROOT, "models/smollm2/*.gguf"))[0]
    llm = Llama(model_path=gguf, n_ctx=2048, logits_all=True, verbose=False, n_threads=2)
    cases = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in TEXTS]
    prompt = "The capital of France is"
    greedy = []
    for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=False), temp=0, top_k=1):
        greedy.append(t)
        if len(greedy) == 16:
            break
    with open(os.path.join(FIX, "smollm2_tokens.json"), "w") as f:
        json.dump({"source": "llama-cpp-python " + __import__("llama_cpp").__version__, "cases": cases,
                   "greedy": {"prompt": prompt, "ids": greedy, "text": llm.detokenize(greedy).decode()}}, f, indent=1)

    text = open(os.path.join(FIX, "ppl_text.txt")).read()
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    nll = nll_of(logits, ids)
    result = {"tokens": len(ids), "ids_head": ids[:16], "llama_cpp": {"mean_nll": nll, "perplexity": math.exp(nll)}}
    st = os.path.join(ROOT, "models/smollm2-st")
    if os.path.isdir(st):
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(st, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0].double().numpy()
        nll = nll_of(out, ids)
        result["transformers_f32"] = {"mean_nll": nll, "perplexity": math.exp(nll)}
    with open(os.path.join(FIX, "smollm2_ppl.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def nll_of(logits, ids):
    total = 0.0
    for i in range(len(ids) - 1):
        row = logits[i]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        total += lse - row[ids[i + 1]]
    return total / (len(ids) - 1)


if __name__ == "__main__":
    main()
