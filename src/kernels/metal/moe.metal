// Metal twin of src/kernels/cuda/moe.cu: top-k routing with softmax over the chosen logits,
// grouping of (token, slot) pairs by expert, clamped SwiGLU on interleaved gate/up, and the
// weighted per-token combine (slot order). Built only on macOS.
#include <metal_stdlib>
using namespace metal;

// One simdgroup per token (threadgroups of 32 threads, one per token).
kernel void moe_topk_softmax(device const float *logits [[buffer(0)]], device int *topk_ids [[buffer(1)]],
                             device float *topk_weights [[buffer(2)]], constant int &tokens [[buffer(3)]],
                             constant int &experts [[buffer(4)]], constant int &k [[buffer(5)]],
                             uint token [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
    if (int(token) >= tokens) return;
    device const float *row = logits + ulong(token) * experts;
    float vals[8];
    for (int i = 0; i < 8; ++i) {
        const int ex = int(lane) + 32 * i;
        vals[i] = ex < experts ? row[ex] : -INFINITY;
    }
    float chosen_max = 0.0f, denom = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
        float best = -INFINITY;
        int best_ex = INT_MAX;
        for (int i = 0; i < 8; ++i) {
            const int ex = int(lane) + 32 * i;
            if (ex < experts && (vals[i] > best || (vals[i] == best && ex < best_ex))) { best = vals[i]; best_ex = ex; }
        }
        for (ushort o = 16; o > 0; o >>= 1) {
            const float ob = simd_shuffle_xor(best, o);
            const int oe = simd_shuffle_xor(best_ex, o);
            if (ob > best || (ob == best && oe < best_ex)) { best = ob; best_ex = oe; }
        }
        if (slot == 0) chosen_max = best;
        denom += exp(best - chosen_max);
        if (lane == 0) { topk_ids[token * k + slot] = best_ex; topk_weights[token * k + slot] = best; }
        if (best_ex % 32 == int(lane)) vals[best_ex / 32] = -INFINITY;
    }
    simdgroup_barrier(mem_flags::mem_device);
    if (int(lane) < k) {
        const int at = int(token) * k + int(lane);
        topk_weights[at] = exp(topk_weights[at] - chosen_max) / denom;
    }
}

// One threadgroup; threadgroup memory holds 2 × experts ints.
kernel void moe_group(device const int *topk_ids [[buffer(0)]], constant int &pairs [[buffer(1)]],
                      constant int &k [[buffer(2)]], constant int &experts [[buffer(3)]],
                      device int *offsets [[buffer(4)]], device int *sorted_pairs [[buffer(5)]],
                      device int *sorted_tokens [[buffer(6)]], threadgroup atomic_int *shared [[threadgroup(0)]],
                      uint tid [[thread_index_in_threadgroup]], uint threads [[threads_per_threadgroup]]) {
    threadgroup atomic_int *count = shared;
    threadgroup atomic_int *cursor = shared + experts;
    for (int e = int(tid); e < experts; e += int(threads)) atomic_store_explicit(&count[e], 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int p = int(tid); p < pairs; p += int(threads)) atomic_fetch_add_explicit(&count[topk_ids[p]], 1, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        int run = 0;
        for (int e = 0; e < experts; ++e) {
            offsets[e] = run;
            atomic_store_explicit(&cursor[e], run, memory_order_relaxed);
            run += atomic_load_explicit(&count[e], memory_order_relaxed);
        }
        offsets[experts] = run;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int p = int(tid); p < pairs; p += int(threads)) {
        const int at = atomic_fetch_add_explicit(&cursor[topk_ids[p]], 1, memory_order_relaxed);
        sorted_pairs[at] = p;
        sorted_tokens[at] = p / k;
    }
}

#define MOE_KERNELS(NAME, T)                                                                             \
    kernel void moe_swiglu_##NAME(device const T *gate_up [[buffer(0)]], device T *act [[buffer(1)]],    \
                                  constant ulong &total [[buffer(2)]], constant int &inter [[buffer(3)]], \
                                  constant float &limit [[buffer(4)]], constant float &alpha [[buffer(5)]], \
                                  uint i [[thread_position_in_grid]]) {                                 \
        if (ulong(i) >= total) return;                                                                   \
        const ulong row = i / inter, col = i % inter;                                                    \
        const float gate = min(float(gate_up[row * 2 * inter + 2 * col]), limit);                        \
        const float up = clamp(float(gate_up[row * 2 * inter + 2 * col + 1]), -limit, limit);            \
        act[i] = T((up + 1.0f) * gate / (1.0f + exp(-alpha * gate)));                                    \
    }                                                                                                    \
    kernel void moe_combine_##NAME(device const T *expert_out [[buffer(0)]], device const float *weights [[buffer(1)]], \
                                   device T *out [[buffer(2)]], constant int &tokens [[buffer(3)]],      \
                                   constant int &k [[buffer(4)]], constant int &hidden [[buffer(5)]],    \
                                   uint i [[thread_position_in_grid]]) {                                \
        if (ulong(i) >= ulong(tokens) * hidden) return;                                                  \
        const ulong t = i / hidden, h = i % hidden;                                                      \
        float sum = 0.0f;                                                                                \
        for (int slot = 0; slot < k; ++slot) sum += weights[t * k + slot] * float(expert_out[(t * k + slot) * hidden + h]); \
        out[i] = T(sum);                                                                                 \
    }

MOE_KERNELS(f32, float)
MOE_KERNELS(f16, half)
MOE_KERNELS(bf16, bfloat)
