// Metal twin of src/kernels/cuda/attention.cu: causal attention with per-head sinks and an
// optional sliding window, over a dense or kv_int8 cache ([kv_heads, capacity, head_dim] +
// f16 scales [kv_heads, capacity]). One threadgroup of 4 simdgroups per (query, head).
// Built only on macOS.
#include <metal_stdlib>
using namespace metal;

struct AttentionParams {
    int heads, kv_heads, q_len, head_dim, capacity, kv_len, q_start, window, has_sinks;
    float softmax_scale;
};

template <typename T, bool QUANT>
void attention(device const T *q, device const void *k, device const half *k_scales, device const void *v,
               device const half *v_scales, device const float *sinks, device T *out, constant AttentionParams &p,
               uint2 tg, uint simd, uint lane, uint tid, threadgroup float *warp_m, threadgroup float *warp_l,
               threadgroup float (*warp_acc)[256]) {
    const int qi = int(tg.x), h = int(tg.y);
    const int kvh = h / (p.heads / p.kv_heads), per_lane = p.head_dim / 32;
    const int pos = p.q_start + qi, last = min(pos, p.kv_len - 1);
    const int first = p.window > 0 ? max(0, pos - p.window + 1) : 0;
    float qv[8], acc[8];
    for (int i = 0; i < 8; ++i) {
        qv[i] = i < per_lane ? float(q[(ulong(h) * p.q_len + qi) * p.head_dim + lane + 32 * i]) * p.softmax_scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = first + int(simd); j <= last; j += 4) {
        const ulong row = ulong(kvh) * p.capacity + j;
        const float ks = QUANT ? float(k_scales[row]) : 1.0f, vs = QUANT ? float(v_scales[row]) : 1.0f;
        float dot = 0.0f;
        for (int i = 0; i < per_lane; ++i) {
            const ulong at = row * p.head_dim + lane + 32 * i;
            const float kv = QUANT ? (float(((device const uchar *)k)[at]) - 128.0f) * ks : float(((device const T *)k)[at]);
            dot += qv[i] * kv;
        }
        const float s = simd_sum(dot);
        const float m_new = max(m, s), correction = exp(m - m_new), pr = exp(s - m_new);
        l = l * correction + pr;
        for (int i = 0; i < per_lane; ++i) {
            const ulong at = row * p.head_dim + lane + 32 * i;
            const float vv = QUANT ? (float(((device const uchar *)v)[at]) - 128.0f) * vs : float(((device const T *)v)[at]);
            acc[i] = acc[i] * correction + pr * vv;
        }
        m = m_new;
    }
    if (lane == 0) { warp_m[simd] = m; warp_l[simd] = l; }
    for (int i = 0; i < per_lane; ++i) warp_acc[simd][lane + 32 * i] = acc[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float big = p.has_sinks ? sinks[h] : -INFINITY;
    for (int w = 0; w < 4; ++w) big = max(big, warp_m[w]);
    float denom = p.has_sinks ? exp(sinks[h] - big) : 0.0f;
    for (int w = 0; w < 4; ++w) if (warp_l[w] > 0.0f) denom += warp_l[w] * exp(warp_m[w] - big);
    for (int d = int(tid); d < p.head_dim; d += 128) {
        float sum = 0.0f;
        for (int w = 0; w < 4; ++w) if (warp_l[w] > 0.0f) sum += warp_acc[w][d] * exp(warp_m[w] - big);
        out[(ulong(h) * p.q_len + qi) * p.head_dim + d] = T(denom > 0.0f ? sum / denom : 0.0f);
    }
}

#define ATTENTION_KERNELS(NAME, T)                                                                         \
    kernel void attention_dense_##NAME(device const T *q [[buffer(0)]], device const T *k [[buffer(1)]],  \
                                       device const T *v [[buffer(2)]], device const float *sinks [[buffer(3)]], \
                                       device T *out [[buffer(4)]], constant AttentionParams &p [[buffer(5)]], \
                                       uint2 tg [[threadgroup_position_in_grid]], uint simd [[simdgroup_index_in_threadgroup]], \
                                       uint lane [[thread_index_in_simdgroup]], uint tid [[thread_index_in_threadgroup]]) { \
        threadgroup float wm[4], wl[4], wacc[4][256];                                                      \
        attention<T, false>(q, k, nullptr, v, nullptr, sinks, out, p, tg, simd, lane, tid, wm, wl, wacc);  \
    }                                                                                                      \
    kernel void attention_int8_##NAME(device const T *q [[buffer(0)]], device const uchar *k [[buffer(1)]], \
                                      device const half *k_scales [[buffer(2)]], device const uchar *v [[buffer(3)]], \
                                      device const half *v_scales [[buffer(4)]], device const float *sinks [[buffer(5)]], \
                                      device T *out [[buffer(6)]], constant AttentionParams &p [[buffer(7)]], \
                                      uint2 tg [[threadgroup_position_in_grid]], uint simd [[simdgroup_index_in_threadgroup]], \
                                      uint lane [[thread_index_in_simdgroup]], uint tid [[thread_index_in_threadgroup]]) { \
        threadgroup float wm[4], wl[4], wacc[4][256];                                                      \
        attention<T, true>(q, k, k_scales, v, v_scales, sinks, out, p, tg, simd, lane, tid, wm, wl, wacc);  \
    }

ATTENTION_KERNELS(f32, float)
ATTENTION_KERNELS(f16, half)
ATTENTION_KERNELS(bf16, bfloat)
