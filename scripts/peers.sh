#!/usr/bin/env bash
# Sets up the peers our benchmarks and reference fixtures compare against, into $XLLM_PEERS
# (default: .peers/ in the repository, ignored by git). Idempotent; rerun to finish a partial setup.
#
#   scripts/peers.sh venv        # Python env: torch (CPU), transformers, sentence-transformers, gguf,
#                                # llama-cpp-python, openai, ollama, jsonschema
#   scripts/peers.sh llama.cpp   # llama.cpp's own tools built from the llama-cpp-python sdist
#   scripts/peers.sh llama.cpp-avx2  # the same tools built for AVX2 only (no AVX-512, no VNNI) into
#                                # llama.cpp/build-avx2: the peer for our AVX2 paths (XLLM_NO_AVX512=1),
#                                # i.e. what an AVX2-only CPU runs on both sides
#   scripts/peers.sh all
#
# Afterwards: $XLLM_PEERS/venv/bin/python, $XLLM_PEERS/llama.cpp/build/bin/llama-{bench,batched-bench,
# server,perplexity,quantize,imatrix,tokenize}, $XLLM_PEERS/llama.cpp/src (convert_hf_to_gguf.py, gguf-py).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${XLLM_PEERS:-$PWD/.peers}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
mkdir -p "$PEERS"

setup_venv() {
  if [ ! -x "$PEERS/venv/bin/python" ]; then python3 -m venv "$PEERS/venv"; fi
  local py="$PEERS/venv/bin/python"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
    || "$py" -m pip install -q torch
  "$py" -m pip install -q transformers accelerate safetensors tokenizers numpy gguf sentencepiece \
    sentence-transformers openai ollama jsonschema cmake
  echo "venv ready: $py"
}

setup_llama_cpp() {
  local variant=${1:-native}
  local dir="$PEERS/llama.cpp"
  mkdir -p "$dir"
  if [ ! -d "$dir/src" ]; then
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python -d "$dir/dl" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$dir"/dl/llama_cpp_python-*.tar.gz -C "$dir/dl"
    mv "$dir"/dl/llama_cpp_python-*/vendor/llama.cpp "$dir/src"
  fi
  local cmake=cmake
  if ! command -v cmake >/dev/null; then
    if [ -x "$PEERS/venv/bin/cmake" ]; then cmake="$PEERS/venv/bin/cmake"
    else python3 -m pip install -q --target "$dir/cmake-py" cmake; cmake="$dir/cmake-py/bin/cmake"
      export PYTHONPATH="$dir/cmake-py${PYTHONPATH:+:$PYTHONPATH}"; fi
  fi
  # The CPU features by name instead of GGML_NATIVE: `-march=native` turns on AMX where the CPU
  # reports it, and in VMs whose kernel does not grant the AMX tile state ggml's AMX matmul dies
  # on its first `ldtilecfg` (seen here: SIGSEGV/SIGILL in ggml_backend_amx_mul_mat). AMX stays off.
  local flags=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  local cpu; cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  has() { [[ " $cpu " == *" $1 "* ]] && echo ON || echo OFF; }
  flags+=(-DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_BMI2="$(has bmi2)"
    -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" -DGGML_AVX_VNNI="$(has avx_vnni)"
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)")
  local build="$dir/build"
  if [ "$variant" = avx2 ]; then
    # Later -D options win: everything past AVX2 off, as on a CPU that has only AVX2/FMA/F16C.
    flags+=(-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
      -DGGML_AVX512_BF16=OFF)
    build="$dir/build-avx2"
  fi
  "$cmake" -S "$dir/src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    "${flags[@]}" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
  if [ "$variant" = avx2 ]; then
    "$cmake" --build "$build" -j "${JOBS:-2}" --target llama-bench llama-batched-bench
  else
    "$cmake" --build "$build" -j "${JOBS:-2}" --target llama-bench llama-batched-bench llama-server \
      llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-cli
  fi
  echo "llama.cpp tools: $build/bin"
}

case "${1:-all}" in
  venv) setup_venv ;;
  llama.cpp) setup_llama_cpp ;;
  llama.cpp-avx2) setup_llama_cpp avx2 ;;
  all) setup_venv; setup_llama_cpp ;;
  *) echo "usage: $0 [venv|llama.cpp|llama.cpp-avx2|all]" >&2; exit 2 ;;
esac
