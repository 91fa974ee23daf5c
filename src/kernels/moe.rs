//! Mixture-of-experts dispatch with MXFP4 experts (gpt-oss semantics).
//!
//! For every token: router logits `[experts]` → the `top_k` largest (ties: lower index first) →
//! softmax over those `top_k` logits only → routing weights. Tokens are grouped by expert; each
//! active expert runs on its tokens only:
//!
//! ```text
//! gu   = x · gate_upᵀ + gate_up_bias          // [n, 2·I], gate = gu[.., 0::2], up = gu[.., 1::2]
//! gate = min(gate, limit);  up = clamp(up, −limit, limit)
//! h    = (up + 1) · gate · σ(alpha · gate)     // [n, I]
//! y    = h · downᵀ + down_bias                 // [n, H]
//! out[token] += routing_weight · y             // experts visited in increasing index order
//! ```
//!
//! A decode step (one token) therefore reads exactly `top_k` experts' bytes. Weight layouts are
//! those of [`super::mxfp4`] stacked over experts: `gate_up_blocks [E, 2I, H/32, 16]`,
//! `gate_up_scales [E, 2I, H/32]`, `down_blocks [E, H, I/32, 16]`, `down_scales [E, H, I/32]`;
//! biases are f32 `[E, 2I]` and `[E, H]`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::bytes::SharedBytes;
use super::mxfp4::{self, contiguous_f32, from_f32, BLOCK_BYTES, BLOCK_VALUES};

/// The experts' clamped SwiGLU constants (gpt-oss: limit 7.0, alpha 1.702).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwigluParams {
    pub limit: f32,
    pub alpha: f32,
}

/// Routing decisions for a batch of tokens: `indices[t·k + j]` is token `t`'s `j`-th expert (by
/// descending logit) and `weights[t·k + j]` its softmax weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub indices: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Top-k of each row of `logits [tokens, experts]`, softmax over the selected logits.
pub fn route_top_k(logits: &[f32], tokens: usize, experts: usize, top_k: usize) -> Result<Routing> {
    if top_k == 0 || top_k > experts {
        candle_core::bail!("moe: top_k {top_k} must be between 1 and the expert count {experts}");
    }
    if logits.len() != tokens * experts {
        candle_core::bail!(
            "moe: router logits hold {} values, expected {tokens}×{experts}",
            logits.len()
        );
    }
    let mut indices = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut order: Vec<u32> = Vec::with_capacity(experts);
    for row in logits.chunks_exact(experts) {
        order.clear();
        order.extend(0..experts as u32);
        // Stable sort keeps the lower index first among equal logits; NaN sorts last.
        order.sort_by(|&a, &b| {
            let (la, lb) = (row[a as usize], row[b as usize]);
            lb.partial_cmp(&la)
                .unwrap_or_else(|| la.is_nan().cmp(&lb.is_nan()))
        });
        let chosen = &order[..top_k];
        let max = row[chosen[0] as usize];
        let exps: Vec<f32> = chosen
            .iter()
            .map(|&e| (row[e as usize] - max).exp())
            .collect();
        let sum: f32 = exps.iter().sum();
        indices.extend_from_slice(chosen);
        weights.extend(exps.iter().map(|e| e / sum));
    }
    Ok(Routing {
        top_k,
        indices,
        weights,
    })
}

/// For each expert that received tokens (increasing index): `(expert, [(token, weight)])`.
pub fn group_by_expert(routing: &Routing, experts: usize) -> Vec<(usize, Vec<(usize, f32)>)> {
    let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    for (slot, (&e, &w)) in routing.indices.iter().zip(&routing.weights).enumerate() {
        groups[e as usize].push((slot / routing.top_k, w));
    }
    groups
        .into_iter()
        .enumerate()
        .filter(|(_, g)| !g.is_empty())
        .collect()
}

/// gpt-oss's clamped SwiGLU on interleaved `gate_up [n, 2I]` → `[n, I]`.
pub fn clamped_swiglu(gate_up: &[f32], params: SwigluParams, out: &mut [f32]) {
    for (pair, o) in gate_up.chunks_exact(2).zip(out.iter_mut()) {
        let gate = pair[0].min(params.limit);
        let up = pair[1].clamp(-params.limit, params.limit);
        let glu = gate / (1.0 + (-params.alpha * gate).exp());
        *o = (up + 1.0) * glu;
    }
}

/// One MoE layer's expert weights as plain slices (layouts in the module doc).
#[derive(Clone, Copy)]
pub struct MoeWeightsRef<'a> {
    pub experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub gate_up_blocks: &'a [u8],
    pub gate_up_scales: &'a [u8],
    pub gate_up_bias: &'a [f32],
    pub down_blocks: &'a [u8],
    pub down_scales: &'a [u8],
    pub down_bias: &'a [f32],
    pub swiglu: SwigluParams,
}

impl MoeWeightsRef<'_> {
    fn check(&self) -> Result<()> {
        let (e, h, i) = (self.experts, self.hidden, self.intermediate);
        if h % BLOCK_VALUES != 0 || i % BLOCK_VALUES != 0 || h == 0 || i == 0 {
            candle_core::bail!(
                "moe: hidden {h} and intermediate {i} must be positive multiples of 32"
            );
        }
        let checks = [
            (
                "gate_up blocks",
                self.gate_up_blocks.len(),
                e * 2 * i * h / 2,
            ),
            (
                "gate_up scales",
                self.gate_up_scales.len(),
                e * 2 * i * h / BLOCK_VALUES,
            ),
            ("gate_up bias", self.gate_up_bias.len(), e * 2 * i),
            ("down blocks", self.down_blocks.len(), e * h * i / 2),
            (
                "down scales",
                self.down_scales.len(),
                e * h * i / BLOCK_VALUES,
            ),
            ("down bias", self.down_bias.len(), e * h),
        ];
        for (what, got, want) in checks {
            if got != want {
                candle_core::bail!("moe: {what} hold {got} elements, expected {want} (experts={e}, hidden={h}, intermediate={i})");
            }
        }
        Ok(())
    }
}

/// Runs the routed experts on `x [tokens, hidden]` and writes the weighted sum to
/// `out [tokens, hidden]` (overwritten). Only experts named in `routing` are read.
pub fn moe_cpu(
    x: &[f32],
    routing: &Routing,
    tokens: usize,
    w: &MoeWeightsRef,
    out: &mut [f32],
) -> Result<()> {
    w.check()?;
    let (h, i) = (w.hidden, w.intermediate);
    if x.len() != tokens * h
        || out.len() != tokens * h
        || routing.indices.len() != tokens * routing.top_k
    {
        candle_core::bail!(
            "moe: activations, output or routing do not match {tokens} tokens of {h} features"
        );
    }
    if let Some(&bad) = routing.indices.iter().find(|&&e| e as usize >= w.experts) {
        candle_core::bail!(
            "moe: routing names expert {bad}, the layer has {}",
            w.experts
        );
    }
    out.fill(0.0);
    let gu_block_bytes = 2 * i * h / BLOCK_VALUES * BLOCK_BYTES;
    let gu_scale_bytes = 2 * i * h / BLOCK_VALUES;
    let dn_block_bytes = h * i / BLOCK_VALUES * BLOCK_BYTES;
    let dn_scale_bytes = h * i / BLOCK_VALUES;
    for (e, members) in group_by_expert(routing, w.experts) {
        let n = members.len();
        let mut xs = Vec::with_capacity(n * h);
        for &(t, _) in &members {
            xs.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut gate_up = vec![0f32; n * 2 * i];
        mxfp4::mxfp4_matmul_cpu(
            &xs,
            &w.gate_up_blocks[e * gu_block_bytes..(e + 1) * gu_block_bytes],
            &w.gate_up_scales[e * gu_scale_bytes..(e + 1) * gu_scale_bytes],
            n,
            h,
            2 * i,
            &mut gate_up,
        )?;
        let gu_bias = &w.gate_up_bias[e * 2 * i..(e + 1) * 2 * i];
        for row in gate_up.chunks_exact_mut(2 * i) {
            row.iter_mut().zip(gu_bias).for_each(|(v, b)| *v += b);
        }
        let mut act = vec![0f32; n * i];
        clamped_swiglu(&gate_up, w.swiglu, &mut act);
        let mut y = vec![0f32; n * h];
        mxfp4::mxfp4_matmul_cpu(
            &act,
            &w.down_blocks[e * dn_block_bytes..(e + 1) * dn_block_bytes],
            &w.down_scales[e * dn_scale_bytes..(e + 1) * dn_scale_bytes],
            n,
            i,
            h,
            &mut y,
        )?;
        let dn_bias = &w.down_bias[e * h..(e + 1) * h];
        for (row, &(t, weight)) in y.chunks_exact(h).zip(&members) {
            let dst = &mut out[t * h..(t + 1) * h];
            for ((d, v), b) in dst.iter_mut().zip(row).zip(dn_bias) {
                *d += weight * (v + b);
            }
        }
    }
    Ok(())
}

/// One MoE layer's experts, owned: packed bytes stay in the checkpoint mapping, biases as f32.
#[derive(Debug, Clone)]
pub struct MoeExperts {
    pub experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub gate_up_blocks: SharedBytes,
    pub gate_up_scales: SharedBytes,
    pub gate_up_bias: Vec<f32>,
    pub down_blocks: SharedBytes,
    pub down_scales: SharedBytes,
    pub down_bias: Vec<f32>,
    pub swiglu: SwigluParams,
}

impl MoeExperts {
    pub fn as_ref(&self) -> MoeWeightsRef<'_> {
        MoeWeightsRef {
            experts: self.experts,
            hidden: self.hidden,
            intermediate: self.intermediate,
            gate_up_blocks: self.gate_up_blocks.as_slice(),
            gate_up_scales: self.gate_up_scales.as_slice(),
            gate_up_bias: &self.gate_up_bias,
            down_blocks: self.down_blocks.as_slice(),
            down_scales: self.down_scales.as_slice(),
            down_bias: &self.down_bias,
            swiglu: self.swiglu,
        }
    }

    /// Validates every length against the shape.
    pub fn validate(&self) -> Result<()> {
        self.as_ref().check()
    }

    /// Packed bytes held (blocks + scales of both projections).
    pub fn packed_bytes(&self) -> usize {
        self.gate_up_blocks.len()
            + self.gate_up_scales.len()
            + self.down_blocks.len()
            + self.down_scales.len()
    }

    /// `x [tokens, hidden]`, `router_logits [tokens, experts]` → `[tokens, hidden]` (dtype of `x`).
    pub fn forward(&self, x: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        x.apply_op2_no_bwd(router_logits, &MoeOp { experts: self })
    }
}

/// The candle op: `(x, router_logits)` in, experts carried by the op.
pub struct MoeOp<'a> {
    pub experts: &'a MoeExperts,
}

impl CustomOp2 for MoeOp<'_> {
    fn name(&self) -> &'static str {
        "moe-mxfp4"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let m = self.experts;
        let (tokens, hidden) = l1.shape().dims2()?;
        let (rt, re) = l2.shape().dims2()?;
        if hidden != m.hidden || rt != tokens || re != m.experts {
            candle_core::bail!(
                "moe: x is {tokens}×{hidden}, logits {rt}×{re}; the layer has hidden {} and {} experts",
                m.hidden,
                m.experts
            );
        }
        let (dtype, x) = contiguous_f32(s1, l1)?;
        let (_, logits) = contiguous_f32(s2, l2)?;
        let routing = route_top_k(&logits, tokens, m.experts, m.top_k)?;
        let mut out = vec![0f32; tokens * hidden];
        moe_cpu(&x, &routing, tokens, &m.as_ref(), &mut out)?;
        Ok((from_f32(out, dtype), Shape::from((tokens, hidden))))
    }

    /// Our CUDA kernels (src/kernels/cuda/moe.cu + mxfp4.cu), weights uploaded once.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::moe_op_cuda_fwd(self.experts, (s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_softmaxes_only_the_selected_logits() {
        let logits = [0.0, 3.0, 1.0, 3.0, -2.0];
        let r = route_top_k(&logits, 1, 5, 2).unwrap();
        assert_eq!(r.indices, vec![1, 3], "ties keep the lower index first");
        assert!((r.weights[0] - 0.5).abs() < 1e-7 && (r.weights[1] - 0.5).abs() < 1e-7);
        let r = route_top_k(&logits, 1, 5, 3).unwrap();
        assert_eq!(r.indices, vec![1, 3, 2]);
        // Logits 3, 3, 1: softmax over those three only.
        let z = 2.0 * 3f32.exp() + 1f32.exp();
        let want = [3f32.exp() / z, 3f32.exp() / z, 1f32.exp() / z];
        for (g, w) in r.weights.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn routing_rejects_bad_top_k() {
        assert!(route_top_k(&[0.0; 4], 1, 4, 5).is_err());
        assert!(route_top_k(&[0.0; 4], 1, 4, 0).is_err());
        assert!(route_top_k(&[0.0; 3], 1, 4, 2).is_err());
    }

    #[test]
    fn swiglu_clamps_gate_above_and_up_both_sides() {
        let p = SwigluParams {
            limit: 7.0,
            alpha: 1.702,
        };
        let mut out = [0f32; 3];
        clamped_swiglu(&[10.0, -10.0, -3.0, 20.0, 1.0, 0.5], p, &mut out);
        let f = |g: f32, u: f32| (u + 1.0) * g / (1.0 + (-1.702 * g).exp());
        assert!((out[0] - f(7.0, -7.0)).abs() < 1e-5);
        assert!(
            (out[1] - f(-3.0, 7.0)).abs() < 1e-5,
            "gate has no lower clamp"
        );
        assert!((out[2] - f(1.0, 0.5)).abs() < 1e-6);
    }
}
