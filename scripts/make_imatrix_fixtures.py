#!/usr/bin/env python3
"""Reference bytes for `xllm quantize --imatrix` from llama-quantize (tests/quantize_reference.rs).

1. tests/fixtures/quantize/synthetic.imatrix.gguf: an importance matrix in llama.cpp's GGUF
   imatrix format for every blk.* matmul weight of the synthetic 8-layer model of
   make_quantize_fixtures.py. Sums are exact f32 values from xorshift32 streams, spread over five
   orders of magnitude so the weighting matters; counts 1536 (3 chunks of 512). Committed (~60 KB).
2. tests/fixtures/quantize/imatrix_reference.json: for each type, llama-quantize's output of the
   synthetic model with `--imatrix tests/fixtures/quantize/synthetic.imatrix.gguf` (that exact
   string: it is stored in the file as quantize.imatrix.file): each tensor's type and sha256, and
   the file's sha256.

3. llama-imatrix's own statistics of the MoE / hybrid fixtures, for tests/imatrix_moe.rs (each
   ~40-60 KB): tests/fixtures/quantize/{gpt_oss_tiny,nemotron_h_a}.llama-imatrix.gguf.
   llama-imatrix runs on llama.cpp's own f32 conversion (convert_hf_to_gguf.py) of the fixture,
   on MOE_TEXT in chunks of MOE_CTX tokens (MOE_CHUNKS of them), with an f32 KV cache and no flash
   attention, so that nothing rounds the activations below f32:
   - gpt-oss: from a copy of tests/fixtures/gpt_oss_tiny whose config says `rope_scaling.truncate:
     true` (llama.cpp always rounds YaRN's correction range; openai's configs, and the fixture,
     say false, which moves attention by ~1e-3 and flips the random fixture's knife-edge routing),
     and with the MXFP4 expert tensors widened to F32 after conversion (exact: every MXFP4 value
     is an f32), because llama.cpp's MXFP4 dot product rounds activations to 8 bits (Q8_0),
     which flips routing too. The test runs xllm on the same truncated copy, experts in MXFP4.
   - Nemotron-H (llama.cpp's `nemotron_h_moe`): the fixtures as they are.
4. tests/fixtures/quantize/nemotron_h_a.bf16.gguf (llama.cpp's bf16 conversion, ~0.7 MB) and, in
   tests/fixtures/quantize/imatrix_moe_reference.json, the sha256 of llama-quantize's output of it
   for MOE_TYPES with `--imatrix` nemotron_h_a.llama-imatrix.gguf (per-expert importance of
   ffn_up_exps, whose 64-wide rows fall back to Q4_0/Q5_0/Q8_0 in these mixes).

Needs $XLLM_PEERS (default .peers/) with llama.cpp built (llama-quantize, llama-imatrix) and the
venv (gguf-py, numpy, torch for the converter).
Run from anywhere: python scripts/make_imatrix_fixtures.py [--moe-only]
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_quantize_fixtures as mq  # noqa: E402
import gguf  # noqa: E402  (path set up by make_quantize_fixtures)
import numpy as np  # noqa: E402

IMATRIX = "tests/fixtures/quantize/synthetic.imatrix.gguf"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
         "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
COUNT = 1536.0


def imatrix_sums(name, n):
    s = mq.fnv1a(name + ".imatrix")
    out = np.empty(n, dtype=np.float32)
    for j in range(n):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        # mantissa in [1, 2) times 2^(e) with e in -6..10: exact in f32
        out[j] = (1.0 + (s >> 9) * 2.0 ** -23) * 2.0 ** ((s & 15) - 6) * COUNT / 1024.0
    return out


def write_imatrix(path):
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["synthetic calibration"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    weights = sorted(n for n, ne in mq.synthetic_tensors() if n.startswith("blk.") and len(ne) == 2)
    shapes = dict(mq.synthetic_tensors())
    for name in weights:
        ne0 = shapes[name][0]
        w.add_tensor(name + ".in_sum2", imatrix_sums(name, ne0).reshape(1, ne0))
        w.add_tensor(name + ".counts", np.array([[COUNT]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    exe = os.path.join(mq.LCPP, "build", "bin", "llama-quantize")
    if not os.path.exists(exe):
        sys.exit("llama-quantize is not built (scripts/peers.sh llama.cpp)")
    os.chdir(ROOT)
    write_imatrix(IMATRIX)
    ref = {"imatrix": IMATRIX, "types": TYPES}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "synthetic-f32.gguf")
        mq.write_synthetic(src)
        ref["synthetic"] = mq.quantize_all(src, tmp, "synthetic-imatrix", TYPES, ["--imatrix", IMATRIX])
    out = os.path.join(ROOT, "tests/fixtures/quantize/imatrix_reference.json")
    with open(out, "w") as f:
        json.dump(ref, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote", out, os.path.getsize(out), "bytes;", IMATRIX, os.path.getsize(IMATRIX), "bytes")


MOE_TEXT = "tests/fixtures/texts/gpl3-excerpt.txt"
MOE_CTX = 64
MOE_CHUNKS = 4
MOE_TYPES = ["Q2_K", "Q4_K_M", "Q6_K"]
# nemotron_h_b is not here: llama.cpp's converter rejects it ("SSM inner size 48 not a multiple of
# head dim 64": it takes d_inner = mamba_num_heads · hidden_size), so the test checks that fixture
# against transformers' routing (its reference.safetensors) instead.
MOE_FIXTURES = [("gpt_oss_tiny", "GptOssForCausalLM"), ("nemotron_h_a", "NemotronHForCausalLM")]


def widen_mxfp4(src, dst):
    """A copy of the GGUF `src` with every MXFP4 tensor dequantized to F32 (exact)."""
    from gguf import quants
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"]
    w = gguf.GGUFWriter(dst, bytes(arch.parts[arch.data[0]]).decode())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(k, vals, t, sub_type=sub)
        elif t == gguf.GGUFValueType.STRING:
            w.add_key_value(k, bytes(f.parts[f.data[0]]).decode(), t)
        else:
            w.add_key_value(k, f.parts[f.data[0]].tolist()[0], t)
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.MXFP4:
            w.add_tensor(t.name, quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fixture_copy(name, tmp):
    """The fixture folder as the reference sees it (gpt-oss: YaRN truncated, see the doc)."""
    import shutil
    dst = os.path.join(tmp, name)
    shutil.copytree(os.path.join(ROOT, "tests/fixtures", name), dst)
    if name.startswith("gpt_oss"):
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg["rope_scaling"]["truncate"] = True
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    return dst


def llama_imatrix(model, out):
    exe = os.path.join(mq.LCPP, "build", "bin", "llama-imatrix")
    # The text path as given is stored in the file (imatrix.datasets): relative to the repository.
    subprocess.run([exe, "-m", model, "-f", MOE_TEXT, "-c", str(MOE_CTX), "--chunks",
                    str(MOE_CHUNKS), "-t", "2", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-o", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)


def moe_fixtures():
    out_dir = os.path.join(ROOT, "tests/fixtures/quantize")
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in MOE_FIXTURES:
            src = fixture_copy(name, tmp)
            f32 = os.path.join(tmp, name + ".f32.gguf")
            mq.convert_fixture(os.path.relpath(src, ROOT), arch, f32, tmp, "f32")
            if name.startswith("gpt_oss"):
                widened = os.path.join(tmp, name + ".f32x.gguf")
                widen_mxfp4(f32, widened)
                f32 = widened
            out = os.path.join(out_dir, name + ".llama-imatrix.gguf")
            llama_imatrix(f32, out)
            print("wrote", out, os.path.getsize(out), "bytes")
        bf16 = os.path.join(out_dir, "nemotron_h_a.bf16.gguf")
        bf16_tmp = os.path.join(tmp, "bf16")
        os.makedirs(bf16_tmp)
        mq.convert_fixture("tests/fixtures/nemotron_h_a", "NemotronHForCausalLM", bf16, bf16_tmp, "bf16")
        print("wrote", bf16, os.path.getsize(bf16), "bytes")
        imatrix = "tests/fixtures/quantize/nemotron_h_a.llama-imatrix.gguf"
        ref = {"imatrix": imatrix, "types": MOE_TYPES, "text": MOE_TEXT, "ctx": MOE_CTX, "chunks": MOE_CHUNKS}
        os.chdir(ROOT)
        ref["nemotron_h_a"] = mq.quantize_all(bf16, tmp, "nemotron_h_a-imatrix", MOE_TYPES, ["--imatrix", imatrix])
        ref["nemotron_h_a_plain"] = mq.quantize_all(bf16, tmp, "nemotron_h_a", MOE_TYPES)
    out = os.path.join(out_dir, "imatrix_moe_reference.json")
    with open(out, "w") as f:
        json.dump(ref, f, indent=0, sort_keys=True)
        f.write("\n")
    print("wrote", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    if "--moe-only" not in sys.argv:
        main()
    moe_fixtures()
