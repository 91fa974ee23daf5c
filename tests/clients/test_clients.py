"""`xllm serve` driven by the official `openai` and `ollama` Python client libraries.

Usage: python tests/clients/test_clients.py XLLM_BINARY SMOLLM2_GGUF TINY_LLAMA_DIR

Starts the server on a free port (with an API key, against a temporary store and a small mock
Hugging Face Hub that serves the tiny-llama fixture for `pull`), then checks what the clients
see: chat and completions streamed and not (the same text at temperature 0), usage counts,
seeds, stop strings, logprobs, model list/show, pull with progress, and the errors the clients
raise. Exits non-zero on the first failure. Run by tests/serve_clients.rs (cargo test), which
skips when the venv made by .ci/run is absent.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import ollama
import openai

KEY = "test-key-123"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class MockHub(http.server.ThreadingHTTPServer):
    """Serves one repository like the Hub: repo info with LFS sha256, `resolve` with Range."""

    def __init__(self, repo, files):
        self.repo = repo
        self.files = files  # path -> (bytes, lfs)
        super().__init__(("127.0.0.1", 0), HubHandler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def not_found(self, code):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        hub = self.server
        path = self.path.split("?")[0]
        info_prefixes = [f"/api/models/{hub.repo}/revision/main", f"/api/models/{hub.repo}"]
        if path in info_prefixes:
            siblings = []
            for name, (data, lfs) in hub.files.items():
                s = {"rfilename": name, "size": len(data)}
                if lfs:
                    s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"id": hub.repo, "sha": COMMIT, "gated": False, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path.startswith("/api/models/"):
            return self.not_found("RepoNotFound")
        prefix = f"/{hub.repo}/resolve/"
        if not path.startswith(prefix):
            return self.not_found("RepoNotFound")
        name = path[len(prefix):].split("/", 1)[1]
        if name not in hub.files:
            return self.not_found("EntryNotFound")
        data, lfs = hub.files[name]
        digest = hashlib.sha256(data).hexdigest()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        if lfs:
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def start_server(binary, args, env):
    proc = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--port", "0", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = []
    address = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            logs.append(line.rstrip())
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if v.get("msg") == "listening":
                address.append(v["address"])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60) or not address:
        proc.kill()
        raise SystemExit("server did not start:\n" + "\n".join(logs))
    base = address[0]
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    return proc, base, logs


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def expect_error(cls, fn, what):
    try:
        fn()
    except cls as e:
        print(f"ok: {what} ({type(e).__name__})")
        return e
    raise AssertionError(f"{what}: no {cls.__name__} raised")


CHAT_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "object": {"const": "chat.completion"},
        "choices": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                    "message": {"type": "object", "required": ["role", "content"]},
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {"prompt_tokens_details": {"type": "object", "required": ["cached_tokens"]}},
        },
    },
}

TAGS_SCHEMA = {
    "type": "object",
    "required": ["models"],
    "properties": {
        "models": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model", "modified_at", "size", "digest", "details"],
                "properties": {"details": {"type": "object", "required": ["format", "family", "quantization_level"]}},
            },
        }
    },
}


def openai_checks(base, tokens_fixture):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    models = [m.id for m in client.models.list()]
    check("smol" in models, f"models.list shows the operator's model: {models}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=24)
    text = reply.choices[0].message.content
    check(len(text.split()) >= 4, f"chat answer: {text!r}")
    jsonschema.validate(reply.model_dump(), CHAT_SCHEMA)
    print("ok: the chat reply matches the chat.completion schema")

    stream = client.chat.completions.create(
        model="smol", messages=messages, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(pieces) == text, "streamed chat text equals the non-streamed text")
    check(finish == reply.choices[0].finish_reason, f"same finish reason ({finish})")
    check(usage is not None and usage.completion_tokens == reply.usage.completion_tokens,
          "include_usage chunk with the same completion tokens")
    check(usage.prompt_tokens == reply.usage.prompt_tokens, "same prompt tokens")
    check(usage.prompt_tokens_details.cached_tokens >= 0, "usage has prompt_tokens_details.cached_tokens")

    # The stream helper's accumulated message (openai-python's merge rules) is the same text.
    with client.chat.completions.stream(model="smol", messages=messages, temperature=0, max_tokens=24) as s:
        try:
            final = s.get_final_completion()
        except openai.LengthFinishReasonError as e:  # the helper's parse step refuses "length"
            final = e.completion
    check(final.choices[0].message.content == text, "the SDK's stream helper accumulates the same text")

    for case in tokens_fixture["cases"][:2]:
        c = client.completions.create(model="smol", prompt=case["text"], max_tokens=1)
        check(c.usage.prompt_tokens == len(case["ids"]),
              f"prompt tokens of {case['text']!r} match llama.cpp's tokenizer ({len(case['ids'])})")

    c = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12, temperature=0)
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model="smol", prompt="The capital of France is", max_tokens=12, temperature=0, stream=True)
        if ch.choices
    )
    check(streamed == c.choices[0].text, "streamed completion equals the non-streamed one")

    def sampled(seed):
        r = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0, max_tokens=20, seed=seed)
        return r.choices[0].message.content

    a = sampled(11)
    check(a == sampled(11), "the same seed reproduces the answer")

    word = text.split()[2]
    r = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=24, stop=[word])
    cut = r.choices[0].message.content
    check(word not in cut and text.startswith(cut), f"stop {word!r} ends the text and is not in it: {cut!r}")
    check(r.choices[0].finish_reason == "stop", "finish_reason stop at a stop string")

    r = client.chat.completions.create(model="smol", messages=messages, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=2, n=2)
    check(len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content,
          "n=2 at temperature 0 gives two equal choices")
    lps = r.choices[0].logprobs.content
    check(len(lps) == 5 and all(len(t.top_logprobs) == 2 for t in lps), "logprobs with top_logprobs")
    check(r.choices[0].finish_reason == "length", "finish_reason length at max_tokens")

    expect_error(openai.NotFoundError,
                 lambda: client.chat.completions.create(model="org/unknown", messages=messages),
                 "unknown model is a 404")
    e = expect_error(openai.BadRequestError,
                     lambda: client.chat.completions.create(model="smol", messages=messages, temperature=5),
                     "temperature 5 is a 400")
    check(e.body and e.body.get("param") == "temperature", f"the error names the field: {e.body}")
    expect_error(openai.BadRequestError,
                 lambda: client.chat.completions.create(
                     model="smol", messages=[{"role": "user", "content": "word " * 5000}]),
                 "a prompt longer than the context is a 400")
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    expect_error(openai.AuthenticationError, lambda: bad.models.list(), "a wrong API key is a 401")

    req = urllib.request.Request(base + "/v1/chat/completions", data=b"{oops", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("bad JSON accepted")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        check(e.code == 400 and body["error"]["type"] == "invalid_request_error", "bad JSON is a 400 envelope")
    return text


def ollama_checks(base, hub_url, openai_text):
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat(model="smol", messages=messages, options={"temperature": 0, "num_predict": 24})
    check(r.message.content == openai_text, "ollama chat equals the OpenAI answer at temperature 0")
    check(r.done and r.eval_count > 0 and r.prompt_eval_count > 0 and r.total_duration > 0,
          "final object with counts and durations")
    pieces = [p.message.content for p in client.chat(model="smol:latest", messages=messages, stream=True,
                                                     options={"temperature": 0, "num_predict": 24})]
    check("".join(pieces) == openai_text, "ollama streamed chat equals the non-streamed one")
    g = client.generate(model="smol", prompt="What is the capital of France?", options={"temperature": 0, "num_predict": 24})
    check(g.response == openai_text and len(g.context) > 0, "generate answers the same, with context")

    tags = client.list()
    jsonschema.validate(tags.model_dump(mode="json"), TAGS_SCHEMA)
    check(any(m.model == "smol" for m in tags.models), "list shows the model")
    show = client.show("smol")
    check(show.modelinfo["general.architecture"] == "llama", "show has model_info")
    check("im_start" in (show.template or ""), "show has the chat template")
    check(any(m.model == "smol" for m in client.ps().models), "ps shows the loaded model")

    progress = list(client.pull("org/tiny-llama", stream=True))
    statuses = [p.status for p in progress]
    check(statuses[0] == "pulling manifest" and statuses[-1] == "success", f"pull progress: {statuses[:3]}…")
    weights = [p for p in progress if p.status == "pulling model.safetensors"]
    check(weights and weights[-1].completed == weights[-1].total, "the weights' progress reaches the total")
    r = client.chat(model="org/tiny-llama", messages=messages, options={"num_predict": 3})
    check(r.done, "the pulled model serves")
    client.delete("org/tiny-llama")
    check(all(m.model != "org/tiny-llama" for m in client.list().models), "delete removes it")

    try:
        client.chat(model="org/unknown", messages=messages)
        raise AssertionError("unknown model accepted")
    except ollama.ResponseError as e:
        check(e.status_code == 404, "ollama ResponseError 404 for an unknown model")
    try:
        ollama.Client(host=base).list()
        raise AssertionError("no key accepted")
    except ollama.ResponseError as e:
        check(e.status_code == 401, "ollama without the key gets 401")


def main():
    binary, gguf, tiny = sys.argv[1:4]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "fixtures", "smollm2_tokens.json")) as f:
        tokens_fixture = json.load(f)
    files = {}
    for name, lfs in [("config.json", False), ("tokenizer.json", False), ("model.safetensors", True)]:
        with open(os.path.join(tiny, name), "rb") as f:
            files[name] = (f.read(), lfs)
    hub = MockHub("org/tiny-llama", files)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ)
        env.update({"XLLM_HOME": os.path.join(home, "xllm"), "HF_HOME": os.path.join(home, "hf"),
                    "HF_ENDPOINT": hub.url, "RAYON_NUM_THREADS": "2"})
        for k in ["XLLM_API_KEY", "XLLM_HOST", "XLLM_PORT", "HF_TOKEN", "HF_HUB_OFFLINE"]:
            env.pop(k, None)
        proc, base, logs = start_server(binary, ["--model", f"smol={gguf}", "--api-key", KEY], env)
        try:
            text = openai_checks(base, tokens_fixture)
            ollama_checks(base, hub.url, text)
        except BaseException:
            print("\n".join(logs[-40:]), file=sys.stderr)
            raise
        finally:
            proc.terminate()
            code = proc.wait(60)
        check(code == 0, "SIGTERM: the server exits 0")
    hub.shutdown()
    print("all client checks passed")


if __name__ == "__main__":
    main()
