#!/usr/bin/env python3
"""A tiny decoder embedding model in the Qwen3-Embedding layout, with sentence-transformers
reference embeddings, written to tests/fixtures/tiny-qwen3-embedding/:

- a random Qwen3 base model (2 layers, hidden 64, GQA 4/2 heads, q/k norms, untied: like
  Qwen3-Embedding-4B/8B the checkpoint has no LM head) saved by sentence-transformers itself, so
  the tensor names are the base model's (`embed_tokens.weight`, `layers.0....`, no `model.`);
- a byte-level BPE tokenizer.json whose post-processor appends `<|endoftext|>` to every input
  (what Qwen3-Embedding's tokenizer does; the last-token pooling reads that token's state),
  padded on the left like the real one;
- modules.json (Transformer, Pooling with `lasttoken`, Normalize), 1_Pooling/config.json,
  sentence_bert_config.json (max_seq_length 600, so one text is truncated and long inputs run
  in more than one 512-token piece);
- reference.json: per text the token ids sentence-transformers feeds the model, its embedding
  encoded alone, and its embedding inside one padded batch of every text; plus the same
  weights pooled with `mean` instead (the test swaps 1_Pooling in a copy of the folder).

Usage: $XLLM_PEERS/venv/bin/python scripts/make_qwen3_embedding_fixture.py
"""
import json
import os
import shutil
import tempfile

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer, models as st_models
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3-embedding")
VOCAB = 320
MAX_SEQ = 600
EOS = "<|endoftext|>"

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is "
    "the capital of Germany. Rivers flow to the sea; mountains rise toward the sky. Embeddings map "
    "text to vectors so that similar meanings are close. What is the capital of France? 12345."
)

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Rivers flow to the sea; mountains rise toward the sky.",
    "a",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Emojis 🤗 and symbols © — “quotes”.",
    "   spaces   around   ",
    "Embeddings map text to vectors so that similar meanings are close. " * 6,
    # Longer than one 512-token piece, within the limit.
    " ".join(f"word{i} capital river" for i in range(110)),
    # Longer than max_seq_length: truncated, the end token kept.
    " ".join(f"mountain {i} sky" for i in range(260)),
]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {EOS}:0", pair=f"$A:0 {EOS}:0 $B:1 {EOS}:1", special_tokens=[(EOS, eos_id)]
    )
    return tok, eos_id


def main():
    torch.manual_seed(13)
    tok, eos_id = make_tokenizer()
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, initializer_range=0.1,
    )
    model = Qwen3Model(config).float().eval()
    # Random init keeps norms at 1; perturb them so those paths are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)

    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "hf")
        model.save_pretrained(hf)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left",
            model_max_length=1024,
        )
        fast.save_pretrained(hf)
        transformer = st_models.Transformer(hf, max_seq_length=MAX_SEQ)
        pooling = st_models.Pooling(64, pooling_mode="lasttoken")
        st = SentenceTransformer(modules=[transformer, pooling, st_models.Normalize()], device="cpu")
        if os.path.isdir(OUT):
            shutil.rmtree(OUT)
        st.save(OUT)

    # Keep what the loader needs; drop what sentence-transformers writes for itself only.
    for name in os.listdir(OUT):
        if name == "README.md":
            os.remove(os.path.join(OUT, name))
    from safetensors import safe_open

    with safe_open(os.path.join(OUT, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "embed_tokens.weight" in names and not any(n.startswith("model.") for n in names), names
    assert not any(n.startswith("lm_head") for n in names), names

    # The reference: the folder as shipped, loaded back by sentence-transformers.
    st = SentenceTransformer(OUT, device="cpu")
    assert st.max_seq_length == MAX_SEQ
    features = st.tokenize(TEXTS)
    ids = []
    for row, mask in zip(features["input_ids"], features["attention_mask"]):
        ids.append([int(t) for t, m in zip(row.tolist(), mask.tolist()) if m])
    assert all(seq[-1] == eos_id for seq in ids), "every input ends with the end token"
    assert max(map(len, ids)) == MAX_SEQ, "one text is truncated"
    assert sorted(map(len, ids))[-2] > 512, "one text runs in two pieces"
    alone = [st.encode([t], convert_to_numpy=True)[0] for t in TEXTS]
    batch = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)

    mean_st = SentenceTransformer(
        modules=[st[0], st_models.Pooling(64, pooling_mode="mean"), st_models.Normalize()],
        device="cpu",
    )
    mean = mean_st.encode(TEXTS, batch_size=4, convert_to_numpy=True)

    ref = {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": MAX_SEQ,
        "eos_id": eos_id,
        "cases": [
            {
                "text": t,
                "ids": i,
                "alone": [float(x) for x in a.astype(np.float32)],
                "batch": [float(x) for x in b.astype(np.float32)],
                "mean": [float(x) for x in m.astype(np.float32)],
            }
            for t, i, a, b, m in zip(TEXTS, ids, alone, batch, mean)
        ],
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)
    total = sum(os.path.getsize(os.path.join(dp, n)) for dp, _, ns in os.walk(OUT) for n in ns)
    print("wrote", OUT, total, "bytes;", "lengths", [len(i) for i in ids])


if __name__ == "__main__":
    main()
