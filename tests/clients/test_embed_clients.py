"""Embeddings of `xllm serve` through the official `openai` and `ollama` Python client libraries.

Usage: python tests/clients/test_embed_clients.py XLLM_BINARY EMBEDDING_MODEL_DIR CAUSAL_MODEL

Starts the server (with an API key) serving the embedding model as `emb` and a causal model as
`lm`, then checks that the vectors each client returns equal, float32 for float32, what
`xllm embed EMBEDDING_MODEL_DIR --json` prints for the same texts: OpenAI's default base64
encoding and `encoding_format="float"`, token-id input, `dimensions`; Ollama's `embed` (list and
single string) and legacy `embeddings`. Also the errors the clients raise for a chat request to
the embedding model and an embedding request to the causal one. Exits non-zero on the first
failure. Run by tests/serve_embed.rs (cargo test), which skips when the venv or the model is
absent.
"""

import array
import json
import os
import subprocess
import sys
import tempfile

import ollama
import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_clients import check, expect_error, start_server  # noqa: E402

KEY = "embed-key-456"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "Emojis 🤗🚀 and symbols ©®™",
    "Embeddings map text to vectors so that similar meanings are close. " * 12,
]


def f32(values):
    """The float32 values of a list of numbers (JSON floats are the shortest f32 forms)."""
    return array.array("f", values).tolist()


def xllm_embed(binary, model, texts, extra=()):
    out = subprocess.run(
        [binary, "embed", model, "--json", *extra, "--", *texts],
        check=True, capture_output=True, text=True,
    )
    doc = json.loads(out.stdout)
    return [f32(v) for v in doc["embeddings"]], doc["tokens"]


def openai_checks(base, reference, tokens, binary, model):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    r = client.embeddings.create(model="emb", input=TEXTS)  # base64 on the wire by default
    check([d.index for d in r.data] == list(range(len(TEXTS))), "openai: one embedding per input, in order")
    got = [f32(d.embedding) for d in r.data]
    check(got == reference, "openai (base64 default): vectors equal `xllm embed`'s")
    check(r.usage.prompt_tokens == sum(tokens) and r.usage.total_tokens == sum(tokens),
          f"openai: usage counts the tokens ({r.usage.prompt_tokens})")
    check(r.model == "emb", "openai: the model name is echoed")

    r = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    check([f32(d.embedding) for d in r.data] == reference, "openai (float): vectors equal `xllm embed`'s")

    one = client.embeddings.create(model="emb", input=TEXTS[1])
    check(f32(one.data[0].embedding) == reference[1], "openai: a single string equals its `xllm embed` vector")

    # Token ids of TEXTS[0] as sentence-transformers feeds them (the MiniLM reference fixture).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "fixtures", "minilm_reference.json")) as f:
        cases = json.load(f)["cases"]
    ids = next((c["ids"] for c in cases if c["text"] == TEXTS[0]), None)
    if ids is not None and os.path.basename(os.path.normpath(model)) == "minilm":
        r = client.embeddings.create(model="emb", input=[ids])
        check(f32(r.data[0].embedding) == reference[0], "openai: token-id input equals the text's vector")

    short, _ = xllm_embed(binary, model, TEXTS[:2], ["--dimensions", "128"])
    r = client.embeddings.create(model="emb", input=TEXTS[:2], dimensions=128)
    check([f32(d.embedding) for d in r.data] == short, "openai: dimensions=128 equals `xllm embed --dimensions 128`")

    e = expect_error(openai.BadRequestError,
                     lambda: client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}]),
                     "openai: chat with the embedding model is a 400")
    check("embedding model" in str(e), f"openai: the error says why: {e}")
    e = expect_error(openai.BadRequestError, lambda: client.embeddings.create(model="lm", input="hi"),
                     "openai: embeddings from a causal model is a 400")
    check("does not support embeddings" in str(e), f"openai: the error says why: {e}")
    expect_error(openai.BadRequestError,
                 lambda: client.embeddings.create(model="emb", input="hi", dimensions=100000),
                 "openai: too many dimensions is a 400")


def ollama_checks(base, reference, tokens):
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
    r = client.embed(model="emb", input=TEXTS)
    check([f32(v) for v in r.embeddings] == reference, "ollama embed: vectors equal `xllm embed`'s")
    check(r.prompt_eval_count == sum(tokens), f"ollama embed: prompt_eval_count {r.prompt_eval_count}")
    check(r.total_duration and r.total_duration > 0, "ollama embed: total_duration is set")
    r = client.embed(model="emb", input=TEXTS[2])
    check(f32(r.embeddings[0]) == reference[2], "ollama embed: a single string")
    r = client.embeddings(model="emb", prompt=TEXTS[3])
    check(f32(r.embedding) == reference[3], "ollama embeddings (legacy): the same vector")
    e = expect_error(ollama.ResponseError, lambda: client.chat(model="emb", messages=[{"role": "user", "content": "hi"}]),
                     "ollama: chat with the embedding model is an error")
    check(e.status_code == 400 and "embedding model" in str(e), f"ollama: 400 saying why: {e}")
    e = expect_error(ollama.ResponseError, lambda: client.embed(model="lm", input="hi"),
                     "ollama: embed with a causal model is an error")
    check(e.status_code == 400, f"ollama: 400 ({e})")
    show = client.show("emb")
    check("embedding" in (show.capabilities or []), f"ollama show: capabilities {show.capabilities}")


def main():
    binary, model, causal = sys.argv[1:4]
    reference, tokens = xllm_embed(binary, model, TEXTS)
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ)
        env.update({"XLLM_HOME": os.path.join(home, "xllm"), "HF_HOME": os.path.join(home, "hf"),
                    "RAYON_NUM_THREADS": "2"})
        for k in ["XLLM_API_KEY", "XLLM_HOST", "XLLM_PORT", "HF_TOKEN", "HF_HUB_OFFLINE"]:
            env.pop(k, None)
        proc, base, logs = start_server(
            binary, ["--model", f"emb={model}", "--model", f"lm={causal}", "--api-key", KEY], env)
        try:
            openai_checks(base, reference, tokens, binary, model)
            ollama_checks(base, reference, tokens)
        except BaseException:
            print("\n".join(logs[-40:]), file=sys.stderr)
            raise
        finally:
            proc.terminate()
            code = proc.wait(60)
        check(code == 0, "SIGTERM: the server exits 0")
    print("all embedding client checks passed")


if __name__ == "__main__":
    main()
