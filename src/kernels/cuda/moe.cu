// Mixture-of-experts dispatch for gpt-oss, all on the device (no host round trip per layer):
//   moe_topk_softmax: router logits -> top-k experts per token + softmax over the k chosen logits
//   moe_group:        (token, slot) pairs grouped by expert: offsets + sorted pair/token ids, the
//                     "segments" the MXFP4 kernels take (only active experts do any work)
//   moe_swiglu_*:     clamped SwiGLU on the interleaved gate_up output
//   moe_combine_*:    weighted sum of each token's k expert outputs (a scatter-add, in slot order
//                     so the result does not depend on the grouping order)
#include "common.cuh"

// One warp per token. k rounds of a warp-wide argmax (ties: the lower expert index), then the
// softmax of the chosen logits, written in descending order of logit.
extern "C" __global__ void moe_topk_softmax(const float *__restrict__ logits, int *__restrict__ topk_ids,
                                            float *__restrict__ topk_weights, int tokens, int experts, int k) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= tokens) return;
    const float *row = logits + (size_t)warp * experts;
    constexpr int MAX_PER_LANE = 8;  // up to 256 experts
    float vals[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) {
        const int ex = lane + 32 * i;
        vals[i] = ex < experts ? row[ex] : -INFINITY;
    }
    float chosen_max = 0.f, denom = 0.f;
    for (int slot = 0; slot < k; ++slot) {
        float best = -INFINITY;
        int best_ex = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; ++i) {
            const int ex = lane + 32 * i;
            if (ex < experts && (vals[i] > best || (vals[i] == best && ex < best_ex))) {
                best = vals[i];
                best_ex = ex;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oe = __shfl_xor_sync(0xffffffffu, best_ex, o);
            if (ob > best || (ob == best && oe < best_ex)) {
                best = ob;
                best_ex = oe;
            }
        }
        if (slot == 0) chosen_max = best;
        denom += expf(best - chosen_max);
        if (lane == 0) {
            topk_ids[warp * k + slot] = best_ex;
            topk_weights[warp * k + slot] = best;  // logit for now, normalized below
        }
        if ((best_ex % 32) == lane) vals[best_ex / 32] = -INFINITY;
    }
    __syncwarp();
    if (lane < k) {
        const int at = warp * k + lane;
        topk_weights[at] = expf(topk_weights[at] - chosen_max) / denom;
    }
}

// One block. counts -> exclusive offsets[experts + 1]; then every pair p = token * k + slot is
// placed in its expert's range: sorted_pairs[i] = p, sorted_tokens[i] = token. The order inside
// an expert's range is arbitrary; nothing downstream depends on it.
extern "C" __global__ void moe_group(const int *__restrict__ topk_ids, int pairs, int k, int experts,
                                     int *__restrict__ offsets, int *__restrict__ sorted_pairs,
                                     int *__restrict__ sorted_tokens) {
    extern __shared__ int shared[];
    int *count = shared;            // [experts]
    int *cursor = shared + experts; // [experts]
    for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&count[topk_ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < experts; ++e) {
            offsets[e] = run;
            cursor[e] = run;
            run += count[e];
        }
        offsets[experts] = run;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int at = atomicAdd(&cursor[topk_ids[p]], 1);
        sorted_pairs[at] = p;
        sorted_tokens[at] = p / k;
    }
}

// gate_up [rows, 2 * inter] with gate at even and up at odd columns -> act [rows, inter]:
// gate = min(gate, limit), up = clamp(up, -limit, limit), act = (up + 1) * gate * σ(alpha * gate).
template <typename T>
__device__ void moe_swiglu(const T *__restrict__ gate_up, T *__restrict__ act, size_t total, int inter,
                           float limit, float alpha) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / inter, col = i % inter;
        const T *src = gate_up + row * 2 * inter + 2 * col;
        const float gate = fminf(to_f32(src[0]), limit);
        const float up = fminf(fmaxf(to_f32(src[1]), -limit), limit);
        const float glu = gate / (1.0f + expf(-alpha * gate));
        act[i] = from_f32<T>((up + 1.0f) * glu);
    }
}

// out[t, h] = Σ_slot weight[t, slot] · expert_out[t * k + slot, h], summed in f32 in slot order.
template <typename T>
__device__ void moe_combine(const T *__restrict__ expert_out, const float *__restrict__ weights,
                            T *__restrict__ out, int tokens, int k, int hidden) {
    const size_t total = (size_t)tokens * hidden;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / hidden, h = i % hidden;
        float sum = 0.f;
        for (int slot = 0; slot < k; ++slot)
            sum += weights[t * k + slot] * to_f32(expert_out[(t * k + slot) * hidden + h]);
        out[i] = from_f32<T>(sum);
    }
}

#define MOE_KERNELS(NAME, T)                                                                             \
    extern "C" __global__ void moe_swiglu_##NAME(const T *gate_up, T *act, size_t total, int inter,     \
                                                 float limit, float alpha) {                             \
        moe_swiglu<T>(gate_up, act, total, inter, limit, alpha);                                         \
    }                                                                                                    \
    extern "C" __global__ void moe_combine_##NAME(const T *expert_out, const float *weights, T *out,    \
                                                  int tokens, int k, int hidden) {                      \
        moe_combine<T>(expert_out, weights, out, tokens, k, hidden);                                     \
    }

FOR_EACH_DTYPE(MOE_KERNELS)
