// Metal twin of src/kernels/cuda/mxfp4.cu (same layout, same segment scheme, same results).
// y[rows, out] = x[rows, in] · W[out, in]ᵀ (+ bias); W as gpt-oss MXFP4:
//   blocks u8 [experts, out, in/32, 16] (LOW nibble = even element), scales u8 [experts, out, in/32]
//   (E8M0: 2^(s - 127)). Segment s (expert s when offsets are given) covers sorted rows
//   offsets[s] .. offsets[s+1]; sorted row i reads x row x_rows[i] and writes y row y_rows[i].
// Built only on macOS (MSL 3.1 for bfloat).
#include <metal_stdlib>
using namespace metal;

constant float FP4_VALUES[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

struct Mxfp4Params {
    int has_offsets, has_x_rows, has_y_rows;
    int rows, in_features, out_features, has_bias;
};

inline float e8m0(uchar s) { return ldexp(1.0f, int(s) - 127); }

// Decode path: one simdgroup (32 lanes) per output feature, 8 simdgroups per threadgroup;
// threadgroup grid = (ceil(out / 8), segments).
template <typename T>
void mxfp4_gemv(device const T *x, device const uchar *blocks, device const uchar *scales,
                device const T *bias, device T *y, device const int *offsets, device const int *x_rows,
                device const int *y_rows, constant Mxfp4Params &p, uint2 tg, uint simd, uint lane) {
    const int o = int(tg.x) * 8 + int(simd);
    const int s = int(tg.y);
    if (o >= p.out_features) return;
    const int begin = p.has_offsets ? offsets[s] : 0, end = p.has_offsets ? offsets[s + 1] : p.rows;
    if (begin >= end) return;
    const int nb = p.in_features / 32;
    const ulong e = p.has_offsets ? ulong(s) : 0;
    device const uchar *wrow = blocks + (e * p.out_features + o) * nb * 16;
    device const uchar *srow = scales + (e * p.out_features + o) * nb;
    const float b = p.has_bias ? float(bias[e * p.out_features + o]) : 0.0f;
    for (int chunk = begin; chunk < end; chunk += 8) {
        const int n = min(8, end - chunk);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int blk = int(lane); blk < nb; blk += 32) {
            const float scale = e8m0(srow[blk]);
            float w[32];
            for (int j = 0; j < 16; ++j) {
                const uchar v = wrow[blk * 16 + j];
                w[2 * j] = FP4_VALUES[v & 0xf] * scale;
                w[2 * j + 1] = FP4_VALUES[v >> 4] * scale;
            }
            for (int r = 0; r < n; ++r) {
                const int xr = p.has_x_rows ? x_rows[chunk + r] : chunk + r;
                device const T *xrow = x + ulong(xr) * p.in_features + blk * 32;
                float sum = 0.0f;
                for (int j = 0; j < 32; ++j) sum += w[j] * float(xrow[j]);
                acc[r] += sum;
            }
        }
        for (int r = 0; r < n; ++r) {
            const float total = simd_sum(acc[r]);
            const int yr = p.has_y_rows ? y_rows[chunk + r] : chunk + r;
            if (lane == 0) y[ulong(yr) * p.out_features + o] = T(total + b);
        }
    }
}

// Prefill path: 64 rows × 64 features per threadgroup of 256 threads, K stepped by 32;
// threadgroup grid = (ceil(out / 64), ceil(max_rows / 64), segments).
template <typename T>
void mxfp4_gemm(device const T *x, device const uchar *blocks, device const uchar *scales,
                device const T *bias, device T *y, device const int *offsets, device const int *x_rows,
                device const int *y_rows, constant Mxfp4Params &p, uint3 tg, uint tid,
                threadgroup float (*xs)[65], threadgroup float (*ws)[65]) {
    const int s = int(tg.z);
    const int begin = p.has_offsets ? offsets[s] : 0, end = p.has_offsets ? offsets[s + 1] : p.rows;
    const int m0 = begin + int(tg.y) * 64;
    if (m0 >= end) return;
    const int n0 = int(tg.x) * 64, nb = p.in_features / 32;
    const ulong e = p.has_offsets ? ulong(s) : 0;
    const int load_row = int(tid) / 4, load_k = (int(tid) % 4) * 8;
    const int xm = m0 + load_row;
    const int xr = xm < end ? (p.has_x_rows ? x_rows[xm] : xm) : -1;
    const int wn = n0 + load_row;
    const ulong wbase = (e * p.out_features + wn) * nb;
    const int ty = int(tid) / 16, tx = int(tid) % 16;
    float acc[4][4] = {{0}};
    for (int blk = 0; blk < nb; ++blk) {
        for (int j = 0; j < 8; ++j)
            xs[load_k + j][load_row] = xr >= 0 ? float(x[ulong(xr) * p.in_features + blk * 32 + load_k + j]) : 0.0f;
        if (wn < p.out_features) {
            const float scale = e8m0(scales[wbase + blk]);
            for (int byte = 0; byte < 4; ++byte) {
                const uchar v = blocks[(wbase + blk) * 16 + load_k / 2 + byte];
                ws[load_k + byte * 2][load_row] = FP4_VALUES[v & 0xf] * scale;
                ws[load_k + byte * 2 + 1][load_row] = FP4_VALUES[v >> 4] * scale;
            }
        } else {
            for (int j = 0; j < 8; ++j) ws[load_k + j][load_row] = 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int k = 0; k < 32; ++k)
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += xs[k][ty * 4 + i] * ws[k][tx * 4 + j];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= end) continue;
        const int yr = p.has_y_rows ? y_rows[m] : m;
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n < p.out_features)
                y[ulong(yr) * p.out_features + n] = T(acc[i][j] + (p.has_bias ? float(bias[e * p.out_features + n]) : 0.0f));
        }
    }
}

#define MXFP4_KERNELS(NAME, T)                                                                          \
    kernel void mxfp4_gemv_##NAME(device const T *x [[buffer(0)]], device const uchar *blocks [[buffer(1)]], \
                                  device const uchar *scales [[buffer(2)]], device const T *bias [[buffer(3)]], \
                                  device T *y [[buffer(4)]], device const int *offsets [[buffer(5)]],       \
                                  device const int *x_rows [[buffer(6)]], device const int *y_rows [[buffer(7)]], \
                                  constant Mxfp4Params &p [[buffer(8)]], uint2 tg [[threadgroup_position_in_grid]], \
                                  uint simd [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) { \
        mxfp4_gemv<T>(x, blocks, scales, bias, y, offsets, x_rows, y_rows, p, tg, simd, lane);           \
    }                                                                                                   \
    kernel void mxfp4_gemm_##NAME(device const T *x [[buffer(0)]], device const uchar *blocks [[buffer(1)]], \
                                  device const uchar *scales [[buffer(2)]], device const T *bias [[buffer(3)]], \
                                  device T *y [[buffer(4)]], device const int *offsets [[buffer(5)]],       \
                                  device const int *x_rows [[buffer(6)]], device const int *y_rows [[buffer(7)]], \
                                  constant Mxfp4Params &p [[buffer(8)]], uint3 tg [[threadgroup_position_in_grid]], \
                                  uint tid [[thread_index_in_threadgroup]]) {                           \
        threadgroup float xs[32][65];                                                                   \
        threadgroup float ws[32][65];                                                                   \
        mxfp4_gemm<T>(x, blocks, scales, bias, y, offsets, x_rows, y_rows, p, tg, tid, xs, ws);          \
    }

MXFP4_KERNELS(f32, float)
MXFP4_KERNELS(f16, half)
MXFP4_KERNELS(bf16, bfloat)
