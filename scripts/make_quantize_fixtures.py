#!/usr/bin/env python3
"""Reference bytes for `xllm quantize` from llama.cpp (tests/quantize_reference.rs).

"gguf_py": gguf-py's own numpy quantizers (gguf/quants.py: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0,
TQ2_0, BF16) on three synthetic tensors, sha256 per tensor and type. Needs only gguf-py + numpy.
Then, when llama-quantize is built (skipped otherwise, with a message):

Two sources, each quantized by llama-quantize to every type xllm writes:
  1. "synthetic": a llama-shaped F32 GGUF (8 layers, hidden 256, so K-quants fit) whose values come
     from xorshift32 streams the Rust test regenerates bit for bit (`synthetic_values`).
  2. "tiny_llama": tests/fixtures/tiny-llama (safetensors, hidden 64: every K-quant falls back)
     converted by llama.cpp's convert_hf_to_gguf.py --outtype f32.
  3. "gpt_oss_tiny": tests/fixtures/gpt_oss_tiny converted (bf16, MXFP4 experts repacked) into
     tests/fixtures/quantize/gpt_oss_tiny.bf16.gguf, which is committed: a few types only.
For each output we store every tensor's type and the sha256 of its bytes, and the file's sha256:
tests/fixtures/quantize/llama_cpp_reference.json (small; CI compares against it without llama.cpp).

Needs $XLLM_PEERS (default .peers/) from scripts/peers.sh: venv (torch, numpy) and llama.cpp.
Usage: python scripts/make_quantize_fixtures.py
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("XLLM_PEERS", os.path.join(ROOT, ".peers"))
LCPP = os.path.join(PEERS, "llama.cpp")
sys.path.insert(0, os.path.join(LCPP, "src", "gguf-py"))
import gguf  # noqa: E402
import numpy as np  # noqa: E402

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
         "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "TQ1_0", "TQ2_0"]
HIDDEN, FF, LAYERS, VOCAB, HEADS, KV_HEADS = 256, 512, 8, 256, 4, 2


def fnv1a(s):
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h or 1


def synthetic_values(name, ne):
    """Exact f32 values: xorshift32 from fnv1a(name); row r scaled by 2^(r%4-2); every 61st x8."""
    n0 = ne[0]
    count = 1
    for d in ne:
        count *= d
    s = fnv1a(name)
    out = array("f")
    one_d = len(ne) == 1
    for k in range(count):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        m = ((s >> 9) - (1 << 22)) * 2.0 ** -27
        if k % 61 == 7:
            m *= 8.0
        m *= 2.0 ** ((k // n0) % 4 - 2)
        if one_d:
            m = 1.0 + 8.0 * m
        out.append(m)
    return np.frombuffer(out.tobytes(), dtype=np.float32)


def synthetic_tensors():
    t = [("token_embd.weight", [HIDDEN, VOCAB]), ("output_norm.weight", [HIDDEN]), ("output.weight", [HIDDEN, VOCAB])]
    for i in range(LAYERS):
        for n, ne in [("attn_norm.weight", [HIDDEN]), ("attn_q.weight", [HIDDEN, HIDDEN]),
                      ("attn_k.weight", [HIDDEN, HIDDEN // HEADS * KV_HEADS]),
                      ("attn_v.weight", [HIDDEN, HIDDEN // HEADS * KV_HEADS]),
                      ("attn_output.weight", [HIDDEN, HIDDEN]), ("ffn_norm.weight", [HIDDEN]),
                      ("ffn_gate.weight", [HIDDEN, FF]), ("ffn_up.weight", [HIDDEN, FF]),
                      ("ffn_down.weight", [FF, HIDDEN])]:
            t.append((f"blk.{i}.{n}", ne))
    return t


def write_synthetic(path):
    w = gguf.GGUFWriter(path, "llama")  # writes general.architecture first
    w.add_uint32("llama.block_count", LAYERS)
    w.add_uint32("llama.context_length", 256)
    w.add_uint32("llama.embedding_length", HIDDEN)
    w.add_uint32("llama.feed_forward_length", FF)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_file_type(0)  # general.file_type = ALL_F32: llama-quantize moves it to the end
    for name, ne in synthetic_tensors():
        w.add_tensor(name, synthetic_values(name, ne).reshape(list(reversed(ne))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def describe(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: [t.tensor_type.name, hashlib.sha256(bytes(t.data.tobytes())).hexdigest()] for t in r.tensors}
    with open(path, "rb") as f:
        file_sha = hashlib.sha256(f.read()).hexdigest()
    return {"file_sha256": file_sha, "tensors": tensors}


GPT_OSS_GGUF = os.path.join(ROOT, "tests/fixtures/quantize/gpt_oss_tiny.bf16.gguf")
GPT_OSS_TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "F16"]


def quantize_all(src, tmp, tag, types=TYPES, flags=()):
    out = {"source": describe(src)}
    exe = os.path.join(LCPP, "build", "bin", "llama-quantize")
    for ty in types:
        dst = os.path.join(tmp, f"{tag}-{ty}.gguf")
        subprocess.run([exe, *flags, src, dst, ty, "1"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out[ty] = describe(dst)
        os.remove(dst)
        print(tag, ty, "ok")
    return out


def convert_fixture(fixture, arch, dst, tmp, outtype="f32"):
    """convert_hf_to_gguf.py on a fixture folder, with the unknown pre-tokenizer hash forced to gpt-2.

    The fixtures' config.json may name no "architectures" (transformers wrote none), so the
    converter gets a copy that names `arch`."""
    import shutil
    src = os.path.join(tmp, os.path.basename(fixture) + "-hf")
    shutil.copytree(os.path.join(ROOT, fixture), src)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("architectures", [arch])
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    code = (
        "import sys; sys.argv = ['convert_hf_to_gguf.py', %r, '--outtype', %r, '--outfile', %r]\n"
        "sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'\n"
        "import runpy; runpy.run_path(%r, run_name='__main__')\n"
    ) % (src, outtype, dst, os.path.join(LCPP, "src", "gguf-py"),
         os.path.join(LCPP, "src"), os.path.join(LCPP, "src", "convert_hf_to_gguf.py"))
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)


GGUF_PY_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "BF16"]
GGUF_PY_TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight"]


def gguf_py_reference():
    from gguf import quants
    shapes = dict(synthetic_tensors())
    out = {}
    for name in GGUF_PY_TENSORS:
        ne = shapes[name]
        x = synthetic_values(name, ne).reshape(list(reversed(ne)))
        for ty in GGUF_PY_TYPES:
            q = quants.quantize(x, gguf.GGMLQuantizationType[ty])
            out.setdefault(ty, {})[name] = hashlib.sha256(q.tobytes()).hexdigest()
    return out


def main():
    ref = {"types": TYPES, "gguf_py": gguf_py_reference()}
    print("gguf-py reference done")
    if not os.path.exists(os.path.join(LCPP, "build", "bin", "llama-quantize")):
        print("llama-quantize not built: only the gguf-py reference is written (run scripts/peers.sh llama.cpp)")
        write(ref)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "synthetic-f32.gguf")
        write_synthetic(src)
        ref["synthetic"] = quantize_all(src, tmp, "synthetic")
        src = os.path.join(tmp, "tiny-llama-f32.gguf")
        convert_fixture("tests/fixtures/tiny-llama", "LlamaForCausalLM", src, tmp)
        ref["tiny_llama"] = quantize_all(src, tmp, "tiny-llama")
        # gpt-oss: the converter repacks the MXFP4 experts; the converted GGUF is committed (small)
        # because xllm quantize reads gpt-oss from GGUF only.
        # llama-quantize requantizes MXFP4 experts (--allow-requantize; its MXFP4_MOE type would keep
        # them), xllm keeps them: the test compares every other tensor, and experts with the source.
        convert_fixture("tests/fixtures/gpt_oss_tiny", "GptOssForCausalLM", GPT_OSS_GGUF, tmp, "bf16")
        ref["gpt_oss_tiny"] = quantize_all(GPT_OSS_GGUF, tmp, "gpt-oss", GPT_OSS_TYPES, ["--allow-requantize"])
    write(ref)


def write(ref):
    out = os.path.join(ROOT, "tests/fixtures/quantize/llama_cpp_reference.json")
    with open(out, "w") as f:
        json.dump(ref, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
