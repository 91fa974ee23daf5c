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

Needs $XLLM_PEERS (default .peers/) with llama.cpp built (llama-quantize) and gguf-py + numpy.
Run from anywhere: python scripts/make_imatrix_fixtures.py
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


if __name__ == "__main__":
    main()
