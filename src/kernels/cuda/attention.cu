// Causal attention over our KV cache with per-head sinks and an optional sliding window, reading
// the cache as stored: dense (compute dtype) or quantized (kv_int8 / kv_fp8 codes + f16 scales,
// dequantized in registers, never materialized).
//
//   q    [heads, q_len, head_dim]                  query i sits at position q_start + i
//   K, V [kv_heads, capacity, head_dim]            only the first kv_len tokens are read
//   out  [heads, q_len, head_dim]
// Query at position p sees keys j with j <= p and, when window > 0, p - j < window. GQA: head h
// reads kv head h / (heads / kv_heads). A sink adds exp(sink[h] - max) to the softmax denominator
// (an extra logit column with no value), as gpt-oss does.
//
// One block of 4 warps per (query, head). Keys are dealt round-robin to the warps; each warp runs
// an online softmax with the dot product split across lanes (lane d holds elements d, d+32, ...),
// then the warps' partial results are merged in shared memory. head_dim <= 256.
#include "kv_codes.cuh"

constexpr int ATTN_WARPS = 4;
constexpr int MAX_PER_LANE = 8;  // head_dim / 32

struct DenseKv {};  // marker: K/V hold compute-dtype values

template <typename T, typename Code> struct KvReader {
    const uint8_t *codes;
    const __half *scales;
    __device__ float scale(size_t row) const { return __half2float(scales[row]); }
    __device__ float value(size_t row, int d, int head_dim, float s) const { return Code::decode(codes[row * head_dim + d]) * s; }
};

template <typename T> struct KvReader<T, DenseKv> {
    const T *values;
    const __half *unused;
    __device__ float scale(size_t) const { return 1.f; }
    __device__ float value(size_t row, int d, int head_dim, float) const { return to_f32(values[row * head_dim + d]); }
};

template <typename T, typename Code>
__device__ void attention(const T *__restrict__ q, KvReader<T, Code> k, KvReader<T, Code> v,
                          const float *__restrict__ sinks, T *__restrict__ out, int heads, int kv_heads,
                          int q_len, int head_dim, int capacity, int kv_len, int q_start, int window,
                          float softmax_scale) {
    const int qi = blockIdx.x, h = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kvh = h / (heads / kv_heads);
    const int per_lane = head_dim / 32;
    const int pos = q_start + qi;
    const int last = min(pos, kv_len - 1);
    const int first = window > 0 ? max(0, pos - window + 1) : 0;

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    const T *qrow = q + ((size_t)h * q_len + qi) * head_dim;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        qv[i] = i < per_lane ? to_f32(qrow[lane + 32 * i]) * softmax_scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = first + warp; j <= last; j += ATTN_WARPS) {
        const size_t row = (size_t)kvh * capacity + j;
        const float ks = k.scale(row);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i)
            if (i < per_lane) dot += qv[i] * k.value(row, lane + 32 * i, head_dim, ks);
        const float s = warp_sum(dot);
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new);
        const float p = expf(s - m_new);
        l = l * correction + p;
        const float vs = v.scale(row);
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i)
            if (i < per_lane) acc[i] = acc[i] * correction + p * v.value(row, lane + 32 * i, head_dim, vs);
        m = m_new;
    }

    __shared__ float warp_m[ATTN_WARPS], warp_l[ATTN_WARPS];
    __shared__ float warp_acc[ATTN_WARPS][MAX_PER_LANE * 32];
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i)
        if (i < per_lane) warp_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();

    float big = sinks ? sinks[h] : -INFINITY;
    for (int w = 0; w < ATTN_WARPS; ++w) big = fmaxf(big, warp_m[w]);
    float denom = sinks ? expf(sinks[h] - big) : 0.f;
    for (int w = 0; w < ATTN_WARPS; ++w)
        if (warp_l[w] > 0.f) denom += warp_l[w] * expf(warp_m[w] - big);
    T *orow = out + ((size_t)h * q_len + qi) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (warp_l[w] > 0.f) sum += warp_acc[w][d] * expf(warp_m[w] - big);
        orow[d] = from_f32<T>(denom > 0.f ? sum / denom : 0.f);
    }
}

#define ATTENTION_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_dense_##NAME(                 \
        const T *q, const T *k, const T *v, const float *sinks, T *out, int heads, int kv_heads,           \
        int q_len, int head_dim, int capacity, int kv_len, int q_start, int window, float softmax_scale) { \
        attention<T, DenseKv>(q, {k, nullptr}, {v, nullptr}, sinks, out, heads, kv_heads, q_len, head_dim, \
                              capacity, kv_len, q_start, window, softmax_scale);                           \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_int8_##NAME(                  \
        const T *q, const uint8_t *k, const __half *k_scales, const uint8_t *v, const __half *v_scales,    \
        const float *sinks, T *out, int heads, int kv_heads, int q_len, int head_dim, int capacity,        \
        int kv_len, int q_start, int window, float softmax_scale) {                                        \
        attention<T, Int8Code>(q, {k, k_scales}, {v, v_scales}, sinks, out, heads, kv_heads, q_len,        \
                               head_dim, capacity, kv_len, q_start, window, softmax_scale);                \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) attention_fp8_##NAME(                   \
        const T *q, const uint8_t *k, const __half *k_scales, const uint8_t *v, const __half *v_scales,    \
        const float *sinks, T *out, int heads, int kv_heads, int q_len, int head_dim, int capacity,        \
        int kv_len, int q_start, int window, float softmax_scale) {                                        \
        attention<T, Fp8Code>(q, {k, k_scales}, {v, v_scales}, sinks, out, heads, kv_heads, q_len,         \
                              head_dim, capacity, kv_len, q_start, window, softmax_scale);                 \
    }

FOR_EACH_DTYPE(ATTENTION_KERNELS)
