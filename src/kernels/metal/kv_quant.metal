// Metal twin of src/kernels/cuda/kv_quant.cu: quantize-on-write of the kv_int8 cache (the
// layout of src/engine/kv_quant.rs). kv_fp8 has no Metal path: candle has no E4M3 conversion on
// Metal and state::kv_quant refuses that profile there. Built only on macOS.
#include <metal_stdlib>
using namespace metal;

struct KvQuantParams {
    int kv_heads, tokens, head_dim, capacity, pos;
};

// One simdgroup (32 threads) per (head, token) row; threadgroups of 32.
#define KV_QUANT_KERNEL(NAME, T)                                                                          \
    kernel void kv_quantize_int8_##NAME(device const T *src [[buffer(0)]], device uchar *codes [[buffer(1)]], \
                                        device half *scales [[buffer(2)]], constant KvQuantParams &p [[buffer(3)]], \
                                        uint row [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) { \
        if (int(row) >= p.kv_heads * p.tokens) return;                                                    \
        const int h = int(row) / p.tokens, t = int(row) % p.tokens;                                       \
        device const T *x = src + ulong(row) * p.head_dim;                                                \
        float amax = 0.0f;                                                                                \
        for (int d = int(lane); d < p.head_dim; d += 32) amax = max(amax, abs(float(x[d])));              \
        amax = simd_max(amax);                                                                            \
        const half scale = half(min(amax / 127.0f, 65504.0f));                                            \
        const float s = float(scale);                                                                     \
        const float divisor = s == 0.0f ? 1.0f : s;                                                       \
        const ulong at = ulong(h) * p.capacity + p.pos + t;                                               \
        for (int d = int(lane); d < p.head_dim; d += 32)                                                  \
            codes[at * p.head_dim + d] = uchar(clamp(round(float(x[d]) / divisor), -127.0f, 127.0f) + 128.0f); \
        if (lane == 0) scales[at] = scale;                                                                \
    }

KV_QUANT_KERNEL(f32, float)
KV_QUANT_KERNEL(f16, half)
KV_QUANT_KERNEL(bf16, bfloat)
