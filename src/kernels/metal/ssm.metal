// Metal twin of src/kernels/cuda/ssm.cu (Mamba2 for Nemotron-H; the CPU reference is
// src/kernels/ssm.rs): causal depthwise conv1d + SiLU with a conv state, the selective-scan
// recurrence with f32 state, and the grouped gated RMSNorm. One sequence per dispatch. Built only
// on macOS.
#include <metal_stdlib>
using namespace metal;

static inline float silu_f(float x) { return x / (1.0f + exp(-x)); }
static inline float softplus_f(float x) { return x > 20.0f ? x : log(1.0f + exp(x)); }

constant int SSM_MAX_KERNEL = 8;

// One thread per channel. x: [tokens, stride]; taps: [kernel, channels]; state: [kernel-1, channels].
kernel void ssm_conv1d_f32(device const float *x [[buffer(0)]], constant int &stride [[buffer(1)]],
                           constant int &tokens [[buffer(2)]], constant int &channels [[buffer(3)]],
                           constant int &kernel_size [[buffer(4)]], device const float *taps [[buffer(5)]],
                           device const float *bias [[buffer(6)]], constant int &has_bias [[buffer(7)]],
                           device float *state [[buffer(8)]], device float *out [[buffer(9)]],
                           uint c [[thread_position_in_grid]]) {
    if (int(c) >= channels || kernel_size < 1 || kernel_size > SSM_MAX_KERNEL) return;
    float window[SSM_MAX_KERNEL];
    float w[SSM_MAX_KERNEL];
    for (int j = 0; j < kernel_size - 1; ++j) window[j] = state[ulong(j) * channels + c];
    for (int j = 0; j < kernel_size; ++j) w[j] = taps[ulong(j) * channels + c];
    const float b = has_bias ? bias[c] : 0.0f;
    for (int t = 0; t < tokens; ++t) {
        window[kernel_size - 1] = x[ulong(t) * stride + c];
        float acc = b;
        for (int j = 0; j < kernel_size; ++j) acc += w[j] * window[j];
        out[ulong(t) * channels + c] = silu_f(acc);
        for (int j = 0; j < kernel_size - 1; ++j) window[j] = window[j + 1];
    }
    for (int j = 0; j < kernel_size - 1; ++j) state[ulong(j) * channels + c] = window[j];
}

struct ScanParams {
    int stride, tokens, heads, head_dim, groups, n;
    float dt_min;
};

constant int SSM_MAX_STATE_PER_LANE = 8;

// One simdgroup (32 threads) per state row (head h, feature p), dispatched as threadgroups of 32.
kernel void ssm_scan_f32(device const float *xbc [[buffer(0)]], device const float *dt_raw [[buffer(1)]],
                         constant ScanParams &q [[buffer(2)]], device const float *a [[buffer(3)]],
                         device const float *d [[buffer(4)]], device const float *dt_bias [[buffer(5)]],
                         device float *state [[buffer(6)]], device float *y [[buffer(7)]],
                         uint row [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
    if (int(row) >= q.heads * q.head_dim || q.n > 32 * SSM_MAX_STATE_PER_LANE) return;
    const int h = int(row) / q.head_dim, p = int(row) % q.head_dim;
    const int g = h / (q.heads / q.groups);
    const int inner = q.heads * q.head_dim;
    const int b_off = inner + g * q.n, c_off = inner + q.groups * q.n + g * q.n;
    device float *s = state + ulong(row) * q.n;
    float reg[SSM_MAX_STATE_PER_LANE];
    for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
        const int k = int(lane) + 32 * i;
        reg[i] = k < q.n ? s[k] : 0.0f;
    }
    for (int t = 0; t < q.tokens; ++t) {
        device const float *r = xbc + ulong(t) * q.stride;
        const float dt = max(softplus_f(dt_raw[ulong(t) * q.heads + h] + dt_bias[h]), q.dt_min);
        const float decay = exp(dt * a[h]);
        const float xv = r[h * q.head_dim + p];
        float acc = 0.0f;
        for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
            const int k = int(lane) + 32 * i;
            if (k < q.n) {
                reg[i] = reg[i] * decay + dt * xv * r[b_off + k];
                acc += reg[i] * r[c_off + k];
            }
        }
        acc = simd_sum(acc);
        if (lane == 0) y[ulong(t) * inner + row] = acc + d[h] * xv;
    }
    for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
        const int k = int(lane) + 32 * i;
        if (k < q.n) s[k] = reg[i];
    }
}

// One threadgroup of 32 threads (one simdgroup) per (token, group).
kernel void ssm_gated_norm_f32(device const float *yv [[buffer(0)]], device const float *z [[buffer(1)]],
                               constant int &z_stride [[buffer(2)]], device const float *weight [[buffer(3)]],
                               constant int &width [[buffer(4)]], constant int &group [[buffer(5)]],
                               constant float &eps [[buffer(6)]], device float *out [[buffer(7)]],
                               uint tg [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
    const int groups = width / group;
    const int t = int(tg) / groups, gi = int(tg) % groups;
    device const float *yr = yv + ulong(t) * width + gi * group;
    device const float *zr = z + ulong(t) * z_stride + gi * group;
    device float *o = out + ulong(t) * width + gi * group;
    float sum = 0.0f;
    for (int i = int(lane); i < group; i += 32) {
        const float v = yr[i] * silu_f(zr[i]);
        o[i] = v;
        sum += v * v;
    }
    sum = simd_sum(sum);
    const float r = rsqrt(sum / group + eps);
    device const float *wg = weight + gi * group;
    for (int i = int(lane); i < group; i += 32) o[i] = wg[i] * (o[i] * r);
}
