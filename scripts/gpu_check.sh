#!/usr/bin/env bash
# GPU checks for a session that has a lent NVIDIA machine (H100/H200, driver 580 = CUDA 13.0).
# The device machine has no Rust and no internet, so the binaries are built here and carried.
#
#   scripts/gpu_check.sh build   # here, no GPU needed: CUDA toolkit from PyPI wheels (first time),
#                                # release binary + test binary with --features cuda, into .dev/gpu/
#   scripts/gpu_check.sh run     # on the device machine, in the repo root, with .dev/gpu carried:
#                                # GPU-vs-CPU parity tests, then the bandwidth benchmark
#
# From the agent tools: run(command="scripts/gpu_check.sh run", carry=[".dev/gpu"]).
# Results go to stdout and, when $OUT is set, to $OUT/gpu_check.log.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
gpu_dir="$repo_root/.dev/gpu"

build() {
    [[ -f "$repo_root/.dev/cuda/env.sh" ]] || nice -n 19 "$repo_root/scripts/cuda-toolkit.sh"
    # shellcheck disable=SC1091
    source "$repo_root/.dev/cuda/env.sh"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-target-cuda}
    cd "$repo_root"
    nice -n 19 cargo build --release --features cuda
    local test_bin
    test_bin=$(nice -n 19 cargo test --release --features cuda --lib --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
    [[ -n "$test_bin" ]] || { echo "error: no test binary was built" >&2; exit 1; }
    mkdir -p "$gpu_dir"
    # The carried tree is limited to 64 MiB: debug line tables are dropped and the binaries
    # (about 40 and 60 MB, mostly candle's embedded PTX) are xz-compressed (about 10 MB together).
    rm -f "$gpu_dir"/*.xz
    objcopy --strip-debug "$CARGO_TARGET_DIR/release/xllm" "$gpu_dir/xllm"
    objcopy --strip-debug "$test_bin" "$gpu_dir/xllm-tests"
    nice -n 19 xz -T2 -6 "$gpu_dir/xllm" "$gpu_dir/xllm-tests"
    ls -la "$gpu_dir"
    echo "carry .dev/gpu and run: scripts/gpu_check.sh run"
}

run() {
    local log=${OUT:-/tmp}/gpu_check.log
    exec > >(tee "$log") 2>&1
    [[ -f "$gpu_dir/xllm-tests.xz" ]] || { echo "error: $gpu_dir/xllm-tests.xz missing: run 'scripts/gpu_check.sh build' first and carry .dev/gpu" >&2; exit 1; }
    local bin=/tmp/xllm-gpu
    mkdir -p "$bin"
    xz -dc "$gpu_dir/xllm.xz" >"$bin/xllm"
    xz -dc "$gpu_dir/xllm-tests.xz" >"$bin/xllm-tests"
    chmod +x "$bin/xllm" "$bin/xllm-tests"
    # The binaries link libcudart/libcublas(Lt)/libcurand/libnvrtc of CUDA 13; the machine's
    # PyTorch ships them as NVIDIA wheels (nvidia/cu13/lib), a system toolkit may too.
    local libdirs=()
    for lib in libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
        local found
        found=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib" -print 2>/dev/null | head -n1 || true)
        [[ -n "$found" ]] && libdirs+=("$(dirname "$found")")
    done
    LD_LIBRARY_PATH=$(printf '%s\n' "${libdirs[@]}" | awk '!seen[$0]++' | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    "$bin/xllm" --version
    echo "== device selection"
    "$bin/xllm" run --device cuda:7 nonexistent-model hi 2>&1 | head -n3 || true
    echo "== parity tests (GPU vs CPU reference)"
    "$bin/xllm-tests" --test-threads=1 kernels::cuda device::
    echo "== benchmark"
    "$bin/xllm-tests" --ignored --nocapture --test-threads=1 bench_moe_decode_against_copy_bandwidth
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
