// The byte codes of the quantized KV caches (shared by quantize-on-write and attention).
#pragma once
#include "common.cuh"
#include <cuda_fp8.h>

struct Int8Code {
    static constexpr float MAX_CODE = 127.0f;
    __device__ static uint8_t encode(float v) { return (uint8_t)(fminf(fmaxf(roundf(v), -127.f), 127.f) + 128.f); }
    __device__ static float decode(uint8_t c) { return (float)c - 128.f; }
};

struct Fp8Code {
    static constexpr float MAX_CODE = 448.0f;
    __device__ static uint8_t encode(float v) { return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }
    __device__ static float decode(uint8_t c) {
        return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, __NV_E4M3)));
    }
};
