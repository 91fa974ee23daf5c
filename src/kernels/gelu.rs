//! The gated MLP activations in one pass, AVX-512 on CPUs that have it: `gelu_tanh(gate) · up`
//! (transformers' `gelu_pytorch_tanh`, Gemma) and `silu(gate) · up` (Llama and its kin).
//!
//! Why our own: candle 0.11's CPU `gelu`/`silu` call libm's `tanhf`/`expf` once per value (no
//! SIMD): ~10 % of Gemma 3 270M's prefill at 2 threads. Here `tanh(u) = sign(u) · (1 − e) /
//! (1 + e)` and `sigmoid(v) = 1 / (1 + e)` (or `e / (1 + e)` for `v < 0`), `e = exp(−2|u|)` /
//! `exp(−|v|)`, with a vectorized `exp` (Taylor polynomial after `n·ln2` reduction, ~1 ulp), 16
//! values at a time; with AVX2/FMA only (and with `XLLM_NO_AVX512=1`) the same formulas 8 values
//! at a time ([`avx2`]); elsewhere candle's own ops, as before.

use crate::kernels::cpu_matmul::{has_avx2_fma_f16c, has_avx512_vnni};
use candle_core::{DType, Device, Result, Tensor};

/// (AVX-512 kernels, any SIMD kernel) for this CPU.
fn simd() -> (bool, bool) {
    let wide = has_avx512_vnni();
    (wide, wide || has_avx2_fma_f16c())
}

/// `gelu_tanh(gate) · up`, elementwise (same shapes).
pub fn gelu_tanh_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (wide, fast) = simd();
    let fast = fast
        && matches!(gate.device(), Device::Cpu)
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims();
    if !fast {
        return gate.gelu()? * up;
    }
    let g = gate.flatten_all()?.to_vec1::<f32>()?;
    let u = up.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; g.len()];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 F (`wide`: has_avx512_vnni implies it) or AVX2 and FMA were detected.
    unsafe {
        if wide {
            avx512::gelu_tanh_mul(&g, &u, &mut out)
        } else {
            avx2::gelu_tanh_mul(&g, &u, &mut out)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    Tensor::from_vec(out, gate.dims(), &Device::Cpu)
}

/// `silu(gate) · up`, elementwise (same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (wide, fast) = simd();
    let fast = fast
        && matches!(gate.device(), Device::Cpu)
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims();
    if !fast {
        return candle_nn::ops::silu(gate)? * up;
    }
    let g = gate.flatten_all()?.to_vec1::<f32>()?;
    let u = up.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; g.len()];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 F (`wide`: has_avx512_vnni implies it) or AVX2 and FMA were detected.
    unsafe {
        if wide {
            avx512::silu_mul(&g, &u, &mut out)
        } else {
            avx2::silu_mul(&g, &u, &mut out)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    Tensor::from_vec(out, gate.dims(), &Device::Cpu)
}

/// `silu(v) = v / (1 + exp(−v))` (candle's formula), for the tail and the tests.
pub fn silu_scalar(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// The scalar definition (candle's formula), for the tail and the tests.
pub fn gelu_tanh_scalar(v: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * v * (1.0 + (C * v * (1.0 + 0.044715 * v * v)).tanh())
}

/// The AVX-512 kernels' formulas on 8 lanes, for CPUs with AVX2 and FMA only. No `vscalefps`:
/// `2^n` is built in the exponent bits, and `exp` of values below −87 (where that would leave the
/// normal range) is 0 — what the formulas' results round to there anyway.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `exp(x)` for `x ≤ 0` (8 lanes), as `avx512::exp_neg`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp_neg(x: __m256) -> __m256 {
        let floor = _mm256_set1_ps(-87.0);
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, floor);
        let x = _mm256_max_ps(x, floor);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bias = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bias));
        _mm256_andnot_ps(tiny, _mm256_mul_ps(p, pow2))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_tanh_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let c = _mm256_set1_ps(0.797_884_6);
        let k = _mm256_set1_ps(0.044715);
        let one = _mm256_set1_ps(1.0);
        let half = _mm256_set1_ps(0.5);
        let sign = _mm256_set1_ps(-0.0);
        let n8 = g.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let v = _mm256_loadu_ps(g.as_ptr().add(i));
            let y = _mm256_mul_ps(
                _mm256_mul_ps(c, v),
                _mm256_fmadd_ps(_mm256_mul_ps(k, v), v, one),
            );
            let a = _mm256_andnot_ps(sign, y);
            let e = exp_neg(_mm256_mul_ps(a, _mm256_set1_ps(-2.0)));
            let t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
            let t = _mm256_or_ps(t, _mm256_and_ps(sign, y));
            let gelu = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t));
            let up = _mm256_loadu_ps(u.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(gelu, up));
        }
        for i in n8..g.len() {
            out[i] = super::gelu_tanh_scalar(g[i]) * u[i];
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let n8 = g.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let v = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp_neg(_mm256_or_ps(v, sign));
            let r = _mm256_div_ps(one, _mm256_add_ps(one, e));
            // sigmoid(−|v|) = e · sigmoid(|v|) for negative lanes.
            let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps());
            let sig = _mm256_blendv_ps(r, _mm256_mul_ps(r, e), neg);
            let up = _mm256_loadu_ps(u.as_ptr().add(i));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_mul_ps(v, sig), up),
            );
        }
        for i in n8..g.len() {
            out[i] = super::silu_scalar(g[i]) * u[i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `exp(x)` for `x ≤ 0` (16 lanes): `x = n·ln2 + r`, a degree-6 polynomial in `r`,
    /// scaled by `2^n` (`vscalefps` flushes to 0 below the f32 range).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_neg(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_tanh_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let c = _mm512_set1_ps(0.797_884_6);
        let k = _mm512_set1_ps(0.044715);
        let one = _mm512_set1_ps(1.0);
        let half = _mm512_set1_ps(0.5);
        let sign = _mm512_set1_ps(-0.0);
        let n16 = g.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let v = _mm512_loadu_ps(g.as_ptr().add(i));
            let y = _mm512_mul_ps(
                _mm512_mul_ps(c, v),
                _mm512_fmadd_ps(_mm512_mul_ps(k, v), v, one),
            );
            let a = _mm512_andnot_ps(sign, y);
            let e = exp_neg(_mm512_mul_ps(a, _mm512_set1_ps(-2.0)));
            let t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
            let t = _mm512_or_ps(t, _mm512_and_ps(sign, y));
            let gelu = _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, t));
            let up = _mm512_loadu_ps(u.as_ptr().add(i));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(gelu, up));
        }
        for i in n16..g.len() {
            out[i] = super::gelu_tanh_scalar(g[i]) * u[i];
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        let sign = _mm512_set1_ps(-0.0);
        let n16 = g.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            let v = _mm512_loadu_ps(g.as_ptr().add(i));
            let e = exp_neg(_mm512_or_ps(v, sign));
            let r = _mm512_div_ps(one, _mm512_add_ps(one, e));
            // sigmoid(−|v|) = e · sigmoid(|v|) for negative lanes.
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
            let sig = _mm512_mask_mul_ps(r, neg, r, e);
            let up = _mm512_loadu_ps(u.as_ptr().add(i));
            _mm512_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm512_mul_ps(_mm512_mul_ps(v, sig), up),
            );
        }
        for i in n16..g.len() {
            out[i] = super::silu_scalar(g[i]) * u[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_matches_the_definition() {
        let vals: Vec<f32> = (0..4001)
            .map(|i| (i as f32 - 2000.0) / 40.0)
            .chain([0.0, -0.0, 1e-8, -1e-8, 100.0, -100.0, 200.0, -200.0])
            .collect();
        let ups: Vec<f32> = (0..vals.len())
            .map(|i| 1.0 - (i % 5) as f32 * 0.5)
            .collect();
        let n = vals.len();
        let g = Tensor::from_vec(vals.clone(), n, &Device::Cpu).unwrap();
        let u = Tensor::from_vec(ups.clone(), n, &Device::Cpu).unwrap();
        let got: Vec<f32> = silu_mul(&g, &u).unwrap().to_vec1().unwrap();
        for i in 0..n {
            let v = vals[i] as f64;
            let exact = v / (1.0 + (-v).exp()) * ups[i] as f64;
            let tol = 4e-7 * (exact.abs() + (v * ups[i] as f64).abs() * 0.5) + 1e-30;
            for (name, x) in [("fast", got[i]), ("scalar", silu_scalar(vals[i]) * ups[i])] {
                assert!(
                    (x as f64 - exact).abs() <= tol,
                    "{name} silu({}) · {}: {x} vs {exact}",
                    vals[i],
                    ups[i]
                );
            }
        }
    }

    #[test]
    fn matches_the_scalar_definition() {
        let vals: Vec<f32> = (0..4001)
            .map(|i| (i as f32 - 2000.0) / 150.0)
            .chain([
                0.0,
                -0.0,
                1e-8,
                -1e-8,
                30.0,
                -30.0,
                90.0,
                -90.0,
                f32::MAX.sqrt(),
            ])
            .collect();
        let ups: Vec<f32> = (0..vals.len())
            .map(|i| 1.0 + (i % 7) as f32 * 0.25)
            .collect();
        let n = vals.len();
        let g = Tensor::from_vec(vals.clone(), n, &Device::Cpu).unwrap();
        let u = Tensor::from_vec(ups.clone(), n, &Device::Cpu).unwrap();
        let got: Vec<f32> = gelu_tanh_mul(&g, &u).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = (g.gelu().unwrap() * &u).unwrap().to_vec1().unwrap();
        for i in 0..n {
            let want = gelu_tanh_scalar(vals[i]) * ups[i];
            // f64 reference of the definition, to bound both.
            let v = vals[i] as f64;
            let exact = 0.5
                * v
                * (1.0 + (0.7978845608028654 * v * (1.0 + 0.044715 * v * v)).tanh())
                * ups[i] as f64;
            let tol = 4e-7 * (exact.abs() + ups[i] as f64 * v.abs() * 0.5) + 1e-30;
            for (name, x) in [("fast", got[i]), ("candle", candle[i]), ("scalar", want)] {
                assert!(
                    (x as f64 - exact).abs() <= tol,
                    "{name} gelu({}) · {}: {x} vs {exact}",
                    vals[i],
                    ups[i]
                );
            }
        }
    }

    /// The AVX2 kernels on their own (the tests above reach them only without AVX-512).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_kernels_match_the_definitions() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let vals: Vec<f32> = (0..4001)
            .map(|i| (i as f32 - 2000.0) / 40.0)
            .chain([
                0.0, -0.0, 1e-8, -1e-8, 86.9, -86.9, 87.5, -87.5, 200.0, -200.0,
            ])
            .collect();
        let ups: Vec<f32> = (0..vals.len())
            .map(|i| 1.0 - (i % 5) as f32 * 0.5)
            .collect();
        let (mut gelu, mut silu) = (vec![0f32; vals.len()], vec![0f32; vals.len()]);
        // SAFETY: AVX2 and FMA detected above.
        unsafe {
            avx2::gelu_tanh_mul(&vals, &ups, &mut gelu);
            avx2::silu_mul(&vals, &ups, &mut silu);
        }
        for i in 0..vals.len() {
            let (v, up) = (vals[i] as f64, ups[i] as f64);
            let t = (0.7978845608028654 * v * (1.0 + 0.044715 * v * v)).tanh();
            for (name, got, exact) in [
                ("gelu", gelu[i], 0.5 * v * (1.0 + t) * up),
                ("silu", silu[i], v / (1.0 + (-v).exp()) * up),
            ] {
                let tol = 4e-7 * (exact.abs() + (v * up).abs() * 0.5) + 1e-30;
                assert!(
                    (got as f64 - exact).abs() <= tol,
                    "{name}({v}) · {up}: {got} vs {exact}"
                );
            }
        }
    }
}
