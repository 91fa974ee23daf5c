// MXFP4 matrix products: y[rows, out] = x[rows, in] · W[out, in]ᵀ (+ bias), W in the gpt-oss
// checkpoint layout, never expanded in memory:
//   blocks u8 [experts, out, in/32, 16]: two E2M1 codes per byte, LOW nibble = even element;
//   scales u8 [experts, out, in/32]: E8M0, the block's factor is 2^(s - 127).
//
// Both kernels take the rows to multiply as "segments" so the MoE dispatch can run each active
// expert on the rows routed to it without copying them: segment s uses expert seg_expert[s] and
// the sorted rows seg_offset[s] .. seg_offset[s+1]; sorted row i reads x row x_rows[i] and writes
// y row y_rows[i]. A dense matmul is one segment with identity rows (null pointers).
#include "common.cuh"

// E2M1 code -> value (bit 3 is the sign).
__constant__ float FP4_VALUES[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

__device__ __forceinline__ float e8m0(uint8_t s) { return ldexpf(1.0f, (int)s - 127); }

struct Segments {
    const int *expert;  // [segments] or null: segment s is expert s (or expert 0 without offsets)
    const int *offset;  // [segments + 1] or null: one segment of `rows` rows
    const int *x_rows;  // [sorted rows] or null: identity
    const int *y_rows;  // [sorted rows] or null: identity
    int rows;           // rows of the single segment when offset is null

    __device__ __forceinline__ int begin(int s) const { return offset ? offset[s] : 0; }
    __device__ __forceinline__ int end(int s) const { return offset ? offset[s + 1] : rows; }
    __device__ __forceinline__ int expert_of(int s) const { return expert ? expert[s] : (offset ? s : 0); }
    __device__ __forceinline__ int x_row(int i) const { return x_rows ? x_rows[i] : i; }
    __device__ __forceinline__ int y_row(int i) const { return y_rows ? y_rows[i] : i; }
};

// Decode path (1..8 rows at a time): one warp per output feature. Each lane reads whole 16-byte
// blocks (coalesced across the warp), dequantizes them in registers through a shared-memory LUT and
// applies them to every row of the chunk, so each weight byte is read once per chunk of 8 rows.
constexpr int GEMV_ROWS = 8;
constexpr int GEMV_WARPS = 8;

template <typename T>
__device__ void mxfp4_gemv(const T *__restrict__ x, const uint8_t *__restrict__ blocks,
                           const uint8_t *__restrict__ scales, const T *__restrict__ bias,
                           T *__restrict__ y, Segments seg, int in_features, int out_features) {
    // The LUT lives in shared memory: lanes look up different codes, which a __constant__ array
    // would serialize; 16 words in 16 banks are read without conflicts.
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = FP4_VALUES[threadIdx.x];
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int o = blockIdx.x * GEMV_WARPS + warp;
    const int s = blockIdx.y;
    if (o >= out_features) return;
    const int begin = seg.begin(s), end = seg.end(s);
    if (begin >= end) return;  // inactive expert: nothing routed to it
    const int nb = in_features / 32;
    const size_t e = seg.expert_of(s);
    const uint4 *wrow = reinterpret_cast<const uint4 *>(blocks + ((e * out_features + o) * nb) * 16);
    const uint8_t *srow = scales + (e * out_features + o) * nb;
    const float b = bias ? to_f32(bias[e * out_features + o]) : 0.0f;

    for (int chunk = begin; chunk < end; chunk += GEMV_ROWS) {
        const int n = min(GEMV_ROWS, end - chunk);
        const T *xr[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) xr[r] = x + (size_t)seg.x_row(chunk + min(r, n - 1)) * in_features;
        float acc[GEMV_ROWS] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int blk = lane; blk < nb; blk += 32) {
            const uint4 packed = __ldg(wrow + blk);
            const float scale = e8m0(__ldg(srow + blk));
            const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
            float w[32];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
#pragma unroll
                for (int byte = 0; byte < 4; ++byte) {
                    const uint32_t v = (words[q] >> (8 * byte)) & 0xffu;
                    w[q * 8 + byte * 2] = lut[v & 0xf] * scale;
                    w[q * 8 + byte * 2 + 1] = lut[v >> 4] * scale;
                }
            }
            const int k0 = blk * 32;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                if (r < n) {
                    float sum = 0.f;
#pragma unroll
                    for (int j = 0; j < 32; ++j) sum += w[j] * to_f32(xr[r][k0 + j]);
                    acc[r] += sum;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) {
            const float total = warp_sum(acc[r]);
            if (lane == 0 && r < n) y[(size_t)seg.y_row(chunk + r) * out_features + o] = from_f32<T>(total + b);
        }
    }
}

// Prefill path: 64 rows × 64 output features per block of 256 threads, K stepped one MXFP4
// block (32) at a time. The weight tile is dequantized once into shared memory and reused by all
// 64 rows; each thread accumulates a 4×4 patch in registers.
constexpr int TILE_M = 64, TILE_N = 64, TILE_K = 32;

template <typename T>
__device__ void mxfp4_gemm(const T *__restrict__ x, const uint8_t *__restrict__ blocks,
                           const uint8_t *__restrict__ scales, const T *__restrict__ bias,
                           T *__restrict__ y, Segments seg, int in_features, int out_features) {
    __shared__ float xs[TILE_K][TILE_M + 1];
    __shared__ float ws[TILE_K][TILE_N + 1];
    __shared__ float lut[16];  // see mxfp4_gemv
    if (threadIdx.x < 16) lut[threadIdx.x] = FP4_VALUES[threadIdx.x];
    __syncthreads();
    const int s = blockIdx.z;
    const int begin = seg.begin(s), end = seg.end(s);
    const int m0 = begin + blockIdx.y * TILE_M;
    if (m0 >= end) return;  // this segment has fewer rows (or none)
    const int n0 = blockIdx.x * TILE_N;
    const int nb = in_features / 32;
    const size_t e = seg.expert_of(s);
    const int tid = threadIdx.x;

    // Loader roles: 4 threads per tile row, each takes 8 consecutive K elements.
    const int load_row = tid / 4, load_k = (tid % 4) * 8;
    const int xm = m0 + load_row;
    const T *xrow = xm < end ? x + (size_t)seg.x_row(xm) * in_features : nullptr;
    const int wn = n0 + load_row;
    const size_t wbase = (e * out_features + wn) * nb;

    const int ty = tid / 16, tx = tid % 16;  // compute roles: 4 rows × 4 features each
    float acc[4][4] = {};

    for (int blk = 0; blk < nb; ++blk) {
#pragma unroll
        for (int j = 0; j < 8; ++j) xs[load_k + j][load_row] = xrow ? to_f32(xrow[blk * 32 + load_k + j]) : 0.f;
        if (wn < out_features) {
            const uint32_t word = *reinterpret_cast<const uint32_t *>(blocks + (wbase + blk) * 16 + load_k / 2);
            const float scale = e8m0(scales[wbase + blk]);
#pragma unroll
            for (int byte = 0; byte < 4; ++byte) {
                const uint32_t v = (word >> (8 * byte)) & 0xffu;
                ws[load_k + byte * 2][load_row] = lut[v & 0xf] * scale;
                ws[load_k + byte * 2 + 1][load_row] = lut[v >> 4] * scale;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) ws[load_k + j][load_row] = 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < TILE_K; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[k][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ws[k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= end) continue;
        T *yrow = y + (size_t)seg.y_row(m) * out_features;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n < out_features) {
                const float b = bias ? to_f32(bias[e * out_features + n]) : 0.f;
                yrow[n] = from_f32<T>(acc[i][j] + b);
            }
        }
    }
}

#define MXFP4_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32) mxfp4_gemv_##NAME(                  \
        const T *x, const uint8_t *blocks, const uint8_t *scales, const T *bias, T *y,                 \
        const int *seg_expert, const int *seg_offset, const int *x_rows, const int *y_rows, int rows, \
        int in_features, int out_features) {                                                           \
        mxfp4_gemv<T>(x, blocks, scales, bias, y, Segments{seg_expert, seg_offset, x_rows, y_rows, rows}, \
                      in_features, out_features);                                                      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) mxfp4_gemm_##NAME(                              \
        const T *x, const uint8_t *blocks, const uint8_t *scales, const T *bias, T *y,                 \
        const int *seg_expert, const int *seg_offset, const int *x_rows, const int *y_rows, int rows, \
        int in_features, int out_features) {                                                           \
        mxfp4_gemm<T>(x, blocks, scales, bias, y, Segments{seg_expert, seg_offset, x_rows, y_rows, rows}, \
                      in_features, out_features);                                                      \
    }

FOR_EACH_DTYPE(MXFP4_KERNELS)
