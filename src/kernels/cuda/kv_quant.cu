// Quantize-on-write for the kv_int8 / kv_fp8 caches, byte for byte the layout of
// src/engine/kv_quant.rs: per (head, token) row of head_dim values,
//   scale = f16(min(amax / MAX_CODE, 65504))   (stored in scales [kv_heads, capacity])
//   code  = encode(v / (scale == 0 ? 1 : scale)) (stored in codes [kv_heads, capacity, head_dim])
// int8: round half away from zero, clamp to ±127, stored +128 in a byte; fp8: E4M3, saturating,
// round to nearest even. One warp per row; rows are written at token position `pos` onwards.
#include "kv_codes.cuh"

// src [kv_heads, tokens, head_dim] contiguous.
template <typename Code, typename T>
__device__ void kv_quantize(const T *__restrict__ src, uint8_t *__restrict__ codes, __half *__restrict__ scales,
                            int kv_heads, int tokens, int head_dim, int capacity, int pos) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (row >= kv_heads * tokens) return;
    const int h = row / tokens, t = row % tokens;
    const T *x = src + (size_t)row * head_dim;
    float amax = 0.f;
    for (int d = lane; d < head_dim; d += 32) amax = fmaxf(amax, fabsf(to_f32(x[d])));
    amax = warp_max(amax);
    const __half scale = __float2half_rn(fminf(amax / Code::MAX_CODE, 65504.f));
    const float s = __half2float(scale);
    const float divisor = s == 0.f ? 1.f : s;
    const size_t at = (size_t)h * capacity + pos + t;
    uint8_t *out = codes + at * head_dim;
    for (int d = lane; d < head_dim; d += 32) out[d] = Code::encode(to_f32(x[d]) / divisor);
    if (lane == 0) scales[at] = scale;
}

#define KV_QUANT_KERNELS(NAME, T)                                                                       \
    extern "C" __global__ void kv_quantize_int8_##NAME(const T *src, uint8_t *codes, __half *scales,   \
                                                       int kv_heads, int tokens, int head_dim,         \
                                                       int capacity, int pos) {                        \
        kv_quantize<Int8Code, T>(src, codes, scales, kv_heads, tokens, head_dim, capacity, pos);       \
    }                                                                                                   \
    extern "C" __global__ void kv_quantize_fp8_##NAME(const T *src, uint8_t *codes, __half *scales,    \
                                                      int kv_heads, int tokens, int head_dim,          \
                                                      int capacity, int pos) {                         \
        kv_quantize<Fp8Code, T>(src, codes, scales, kv_heads, tokens, head_dim, capacity, pos);        \
    }

FOR_EACH_DTYPE(KV_QUANT_KERNELS)
