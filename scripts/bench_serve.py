#!/usr/bin/env python3
"""Serving benchmark: `xllm serve` against llama.cpp's `llama-server -np 8` on the same GGUF, in
the same run, through the same OpenAI streaming client code (stdlib only).

Both servers run side by side; for each concurrency level (default 1, 4, 8, 16) it runs
`--rounds` rounds, interleaved between the servers (A B, B A, ...), each of `concurrency` chat
requests at once, each streaming exactly `--tokens` tokens (`ignore_eos`), and
reports the median over rounds of aggregate output tokens/s (all tokens / wall time) and time
to first token p50/p99 over all rounds' requests
(first chunk with content, as vLLM's benchmark stamps it). Prompts differ per request but share
a system prompt, so both servers' prompt caches warm the same way.

Usage:
  scripts/bench_serve.py --gguf models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      [--xllm target/release/xllm] [--llama-server $XLLM_PEERS/llama.cpp/build/bin/llama-server] \
      [--threads 2] [--levels 1,4,8,16] [--tokens 128] [--rounds 2] [--json out.json]

The peers folder is $XLLM_PEERS (default .peers/ in the repo; see scripts/peers.sh).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def one_request(port, model, prompt, tokens, out):
    body = json.dumps({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in detail."},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft = None
    chunks = 0
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        v = json.loads(data)
        if v.get("usage"):
            usage = v["usage"].get("completion_tokens")
        for c in v.get("choices", []):
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    conn.close()
    out.append({"ttft": ttft, "tokens": usage if usage is not None else chunks,
                "latency": time.perf_counter() - t0})


def run_level(port, model, concurrency, rounds, tokens, offset):
    results = []
    prompts = [f"Tell me about topic number {offset + i}, its history and uses." for i in range(concurrency * rounds)]
    t0 = time.perf_counter()
    lock = threading.Lock()
    queue = list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                p = queue.pop(0)
            one_request(port, model, p, tokens, results)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    total = sum(r["tokens"] for r in results)

    def pct(p):
        if not ttfts:
            return float("nan")
        k = min(len(ttfts) - 1, max(0, round(p / 100 * (len(ttfts) - 1))))
        return ttfts[k]

    return {"concurrency": concurrency, "requests": len(results), "tokens": total,
            "wall_s": wall, "tok_s": total / wall, "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99": pct(99), "ttfts": ttfts}


def start(name, cmd, port, model):
    print(f"# starting {name}: {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    warm = []
    one_request(port, model, "Warm up.", 8, warm)
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def merge(rounds):
    """One row from several interleaved rounds of a level: median throughput, pooled TTFTs."""
    tok_s = statistics.median(r["tok_s"] for r in rounds)
    ttfts = sorted(t for r in rounds for t in r["ttfts"])
    k = min(len(ttfts) - 1, max(0, round(0.99 * (len(ttfts) - 1)))) if ttfts else 0
    return {"concurrency": rounds[0]["concurrency"], "tok_s": tok_s, "rounds_tok_s": [r["tok_s"] for r in rounds],
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99": ttfts[k] if ttfts else float("nan")}


def main():
    peers = os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--xllm", default=os.path.join(ROOT, "target/release/xllm"))
    ap.add_argument("--llama-server", default=os.path.join(peers, "llama.cpp/build/bin/llama-server"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--xllm-parallel", type=int, default=16)
    ap.add_argument("--only", choices=["xllm", "llama"], help="run one server only")
    ap.add_argument("--json")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    servers = {}
    procs = []
    try:
        if a.only != "llama":
            port = free_port()
            cmd = [a.xllm, "serve", "--port", str(port), "--model", f"bench={a.gguf}", "--threads", str(a.threads),
                   "--parallel", str(a.xllm_parallel), "--ctx", str(a.ctx), "--preload", "bench"]
            procs.append(start("xllm", cmd, port, "bench"))
            servers["xllm"] = port
        if a.only != "xllm":
            if not os.path.exists(a.llama_server):
                raise SystemExit(f"no llama-server at {a.llama_server} (scripts/peers.sh llama.cpp)")
            port = free_port()
            cmd = [a.llama_server, "-m", a.gguf, "--port", str(port), "--host", "127.0.0.1", "-np", "8",
                   "-c", str(8 * a.ctx), "-t", str(a.threads), "-tb", str(a.threads)]
            procs.append(start("llama-server -np 8", cmd, port, "bench"))
            servers["llama-server"] = port
        # Both servers stay up (an idle one sleeps); every level runs its rounds interleaved,
        # A B then B A, because this machine's speed drifts within minutes.
        per = {name: [[] for _ in levels] for name in servers}
        for i, c in enumerate(levels):
            for r in range(a.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    res = run_level(servers[name], "bench", c, 1, a.tokens, offset=1000 * i + 100 * r)
                    print(f"# {name} c={c} round {r + 1}: {res['tok_s']:.1f} tok/s, "
                          f"TTFT p50 {res['ttft_p50']:.3f}s p99 {res['ttft_p99']:.3f}s", file=sys.stderr)
                    per[name][i].append(res)
        results = {name: [merge(rows) for rows in per[name]] for name in per}
    finally:
        for p in procs:
            stop(p)
    print("| concurrency | xllm tok/s | llama-server tok/s | ratio | xllm TTFT p50 / p99 (s) | llama-server TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|---|")
    for i, c in enumerate(levels):
        x = results.get("xllm", [None] * len(levels))[i]
        l = results.get("llama-server", [None] * len(levels))[i]
        ratio = f"{x['tok_s'] / l['tok_s']:.2f}x" if x and l else "-"
        fx = f"{x['tok_s']:.1f}" if x else "-"
        fl = f"{l['tok_s']:.1f}" if l else "-"
        tx = f"{x['ttft_p50']:.3f} / {x['ttft_p99']:.3f}" if x else "-"
        tl = f"{l['ttft_p50']:.3f} / {l['ttft_p99']:.3f}" if l else "-"
        print(f"| {c} | {fx} | {fl} | {ratio} | {tx} | {tl} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
