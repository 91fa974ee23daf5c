#!/usr/bin/env python3
"""Makes the safetensors copy of SmolLM2 (models/smollm2-st/) from the Q4_1 GGUF with transformers.

transformers dequantizes the GGUF on load (`gguf_file=`); we save the weights in bf16 (the dtype the
original checkpoint ships in) with the tokenizer, so `xllm` can be compared with transformers on the
same numbers. Needs torch + transformers + gguf (the peers venv: scripts/peers.sh venv).
Usage: python scripts/convert_smollm2_safetensors.py [gguf_path] [out_dir]
"""
import glob
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gguf = sys.argv[1] if len(sys.argv) > 1 else glob.glob(os.path.join(root, "models/smollm2/*.gguf"))[0]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "models/smollm2-st")
folder, name = os.path.split(gguf)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
model = model.to(torch.bfloat16)
os.makedirs(out, exist_ok=True)
# save_pretrained refuses models loaded from GGUF; write the plain pieces ourselves.
state = {k: v.contiguous() for k, v in model.state_dict().items()}
if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
config = model.config
for attr in ("quantization_config",):
    if hasattr(config, attr):
        delattr(config, attr)
config.torch_dtype = torch.bfloat16
# Loaded from GGUF, the config names no architecture; llama.cpp's convert_hf_to_gguf.py needs one.
if not getattr(config, "architectures", None):
    config.architectures = ["LlamaForCausalLM"]
config.save_pretrained(out)
if model.generation_config is not None:
    model.generation_config.save_pretrained(out)
tok.save_pretrained(out)
print("wrote", out, sorted(os.listdir(out)))
