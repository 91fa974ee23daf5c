//! Rotary position embeddings with the scaling variants of transformers' `rope_type`:
//! default, linear, dynamic (NTK), llama3 and YaRN. Cos/sin are computed for the positions of each
//! forward pass (cheap next to the matmuls), so no table sized by the context is kept.

use std::f64::consts::PI;

use candle_core::{DType, Device, Result, Tensor};

use crate::model::config::{RopeConfig, RopeScaling};

/// How rotated pairs are laid out in a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// First half / second half (transformers' `rotate_half`, llama.cpp NEOX).
    Halves,
    /// Adjacent pairs (llama.cpp NORM; GGUF llama converts q/k weights to this layout).
    Interleaved,
}

/// Precomputed inverse frequencies and scaling for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    layout: RopeLayout,
    inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN attention factor).
    magnitude: f64,
}

impl Rope {
    /// `freq_factors` divides the inverse frequencies (GGUF `rope_freqs.weight`).
    pub fn new(config: RopeConfig, layout: RopeLayout, freq_factors: Option<&[f32]>) -> Self {
        let mut inv_freq = base_inv_freq(config.theta, config.rotary_dim);
        let mut magnitude = 1.0;
        match config.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let dim = config.rotary_dim as f64;
                let max_pos = original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim * (max_pos / (rotations * 2.0 * PI)).ln() / (2.0 * config.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    *f = (*f / factor) * (1.0 - extrapolation) + *f * extrapolation;
                }
                magnitude = attention_factor;
            }
        }
        if let Some(factors) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= *d as f64;
            }
        }
        Self {
            config,
            layout,
            inv_freq,
            magnitude,
        }
    }

    pub fn rotary_dim(&self) -> usize {
        self.config.rotary_dim
    }

    /// Cos and sin `[t, rotary_dim / 2]` (f32) for positions `start..start + t`.
    pub fn cos_sin(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let inv_freq = match self.config.scaling {
            RopeScaling::Dynamic {
                factor,
                original_max_position_embeddings,
            } if start + t > original_max_position_embeddings => {
                let dim = self.config.rotary_dim as f64;
                let seq = (start + t) as f64;
                let orig = original_max_position_embeddings as f64;
                let base = self.config.theta
                    * ((factor * seq / orig) - (factor - 1.0)).powf(dim / (dim - 2.0));
                base_inv_freq(base, self.config.rotary_dim)
            }
            _ => self.inv_freq.clone(),
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push((angle.cos() * self.magnitude) as f32);
                sin.push((angle.sin() * self.magnitude) as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (t, half), device)?,
            Tensor::from_vec(sin, (t, half), device)?,
        ))
    }

    /// Rotates `x` `[b, heads, t, head_dim]` (the first `rotary_dim` dims of each head).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (cos, sin) = if dtype == DType::F32 {
            (cos.clone(), sin.clone())
        } else {
            (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?)
        };
        let head_dim = x.dim(3)?;
        let rd = self.config.rotary_dim;
        let rotate = |x: &Tensor| match self.layout {
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin),
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin),
        };
        if rd == head_dim {
            rotate(x)
        } else {
            let rotated = rotate(&x.narrow(3, 0, rd)?)?;
            let rest = x.narrow(3, rd, head_dim - rd)?;
            Tensor::cat(&[&rotated, &rest], 3)
        }
    }
}

fn base_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f64> {
    (0..rotary_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            scaling,
            rotary_dim: 8,
        }
    }

    #[test]
    fn linear_scaling_equals_dividing_positions() {
        let plain = Rope::new(cfg(RopeScaling::Default), RopeLayout::Halves, None);
        let linear = Rope::new(
            cfg(RopeScaling::Linear { factor: 4.0 }),
            RopeLayout::Halves,
            None,
        );
        let (c1, _) = plain.cos_sin(3, 1, &Device::Cpu).unwrap();
        let (c4, _) = linear.cos_sin(12, 1, &Device::Cpu).unwrap();
        let a: Vec<f32> = c1.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = c4.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let rope = Rope::new(
            cfg(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            RopeLayout::Halves,
            None,
        );
        let base = base_inv_freq(10_000.0, 8);
        // Highest frequency (wavelength 2π < 16) untouched, lowest (wavelength ≈ 6283 > 64) / 8.
        assert_eq!(rope.inv_freq[0], base[0]);
        assert!((rope.inv_freq[3] - base[3] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn dynamic_changes_nothing_inside_the_trained_context() {
        let plain = Rope::new(cfg(RopeScaling::Default), RopeLayout::Halves, None);
        let dynamic = Rope::new(
            cfg(RopeScaling::Dynamic {
                factor: 2.0,
                original_max_position_embeddings: 16,
            }),
            RopeLayout::Halves,
            None,
        );
        let (a, _) = plain.cos_sin(5, 10, &Device::Cpu).unwrap();
        let (b, _) = dynamic.cos_sin(5, 10, &Device::Cpu).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let (c, _) = dynamic.cos_sin(5, 20, &Device::Cpu).unwrap();
        let (d, _) = plain.cos_sin(5, 20, &Device::Cpu).unwrap();
        assert_ne!(
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            d.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
