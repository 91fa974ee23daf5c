// Mamba2 kernels for Nemotron-H, twins of src/kernels/ssm.rs (the CPU reference; same formulas,
// f32 state and arithmetic):
//   ssm_conv1d_f32:     causal depthwise conv1d + SiLU over xBC, continuing from the per-sequence
//                       conv state [K-1, C] and leaving the last K-1 inputs in it
//   ssm_scan_f32:       the selective-scan recurrence token by token (decode, and prefill: tokens
//                       run in order, every (head, p) state row in parallel), dt = max(softplus(
//                       dt_raw + dt_bias), dt_min), A per head, D skip, groups of heads sharing B/C
//   ssm_gated_norm_f32: y * silu(z), then RMS-normalised per group of `group` features, * weight
// One sequence per launch (the engine loops over the sequences of a batch, as on the CPU).
#include "common.cuh"

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// One thread per channel; the window (conv state, then the new inputs) is walked in registers.
// x: [tokens, stride] (first `channels` of each row used); taps: [kernel, channels] tap-major;
// state: [kernel - 1, channels], oldest first; out: [tokens, channels].
#define SSM_MAX_KERNEL 8
extern "C" __global__ void ssm_conv1d_f32(const float *__restrict__ x, int stride, int tokens, int channels,
                                          int kernel, const float *__restrict__ taps,
                                          const float *__restrict__ bias, float *__restrict__ state,
                                          float *__restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels || kernel < 1 || kernel > SSM_MAX_KERNEL) return;
    float window[SSM_MAX_KERNEL];
    for (int j = 0; j < kernel - 1; ++j) window[j] = state[(size_t)j * channels + c];
    float w[SSM_MAX_KERNEL];
    for (int j = 0; j < kernel; ++j) w[j] = taps[(size_t)j * channels + c];
    const float b = bias ? bias[c] : 0.f;
    for (int t = 0; t < tokens; ++t) {
        window[kernel - 1] = x[(size_t)t * stride + c];
        float acc = b;
        for (int j = 0; j < kernel; ++j) acc += w[j] * window[j];
        out[(size_t)t * channels + c] = silu_f(acc);
        for (int j = 0; j < kernel - 1; ++j) window[j] = window[j + 1];
    }
    for (int j = 0; j < kernel - 1; ++j) state[(size_t)j * channels + c] = window[j];
}

// One warp per state row (head h, feature p): lanes hold the row's `n` state values (n <= 256)
// in registers across all tokens. xbc: [tokens, stride] holding x [H*P] | B [G*N] | C [G*N];
// dt_raw: [tokens, H]; state: [H, P, N]; y: [tokens, H*P].
#define SSM_MAX_STATE_PER_LANE 8
extern "C" __global__ void ssm_scan_f32(const float *__restrict__ xbc, int stride, const float *__restrict__ dt_raw,
                                        int tokens, int heads, int head_dim, int groups, int n,
                                        const float *__restrict__ a, const float *__restrict__ d,
                                        const float *__restrict__ dt_bias, float dt_min,
                                        float *__restrict__ state, float *__restrict__ y) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (row >= heads * head_dim || n > 32 * SSM_MAX_STATE_PER_LANE) return;
    const int h = row / head_dim, p = row % head_dim;
    const int g = h / (heads / groups);
    const int inner = heads * head_dim;
    const int b_off = inner + g * n, c_off = inner + groups * n + g * n;
    float *s = state + (size_t)row * n;
    float reg[SSM_MAX_STATE_PER_LANE];
#pragma unroll
    for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
        const int k = lane + 32 * i;
        reg[i] = k < n ? s[k] : 0.f;
    }
    const float ah = a[h], dh = d[h], bias = dt_bias[h];
    for (int t = 0; t < tokens; ++t) {
        const float *r = xbc + (size_t)t * stride;
        const float dt = fmaxf(softplus_f(dt_raw[(size_t)t * heads + h] + bias), dt_min);
        const float decay = expf(dt * ah);
        const float xv = r[h * head_dim + p];
        const float xdt = dt * xv;
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
            const int k = lane + 32 * i;
            if (k < n) {
                reg[i] = reg[i] * decay + xdt * r[b_off + k];
                acc += reg[i] * r[c_off + k];
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) y[(size_t)t * inner + row] = acc + dh * xv;
    }
#pragma unroll
    for (int i = 0; i < SSM_MAX_STATE_PER_LANE; ++i) {
        const int k = lane + 32 * i;
        if (k < n) s[k] = reg[i];
    }
}

// One block (256 threads) per (token, group). y: [tokens, width]; z: rows `z_stride` apart;
// weight: [width]; out: [tokens, width].
extern "C" __global__ void ssm_gated_norm_f32(const float *__restrict__ yv, const float *__restrict__ z, int z_stride,
                                              const float *__restrict__ weight, int width, int group, float eps,
                                              float *__restrict__ out) {
    const int groups = width / group;
    const int t = blockIdx.x / groups, gi = blockIdx.x % groups;
    const float *yr = yv + (size_t)t * width + gi * group;
    const float *zr = z + (size_t)t * z_stride + gi * group;
    float *o = out + (size_t)t * width + gi * group;
    float sum = 0.f;
    for (int i = threadIdx.x; i < group; i += blockDim.x) {
        const float v = yr[i] * silu_f(zr[i]);
        o[i] = v;
        sum += v * v;
    }
    __shared__ float partial[32];
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? partial[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float r = rsqrtf(partial[0] / group + eps);
    const float *wg = weight + gi * group;
    for (int i = threadIdx.x; i < group; i += blockDim.x) o[i] = wg[i] * (o[i] * r);
}
