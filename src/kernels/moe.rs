//! Mixture-of-experts: routing and the dispatch that runs only the experts tokens were routed to.
//!
//! The dispatch ([`dispatch`]) is shared by every MoE architecture: tokens are grouped by expert,
//! each active expert runs once on its tokens ([`ExpertFfn`], implemented per weight format and
//! activation), and its outputs are added to each token's row times the routing weight. A decode
//! step (one token) therefore reads exactly `top_k` experts' bytes. Routers:
//!
//! - [`route_top_k`] (gpt-oss): the `top_k` largest logits (ties: lower index first), softmax over
//!   those `top_k` logits only.
//! - [`route_sigmoid_biased`] (Nemotron-H, DeepSeek-V3 style): `σ(logits)`; the choice uses
//!   `σ + correction_bias`, the weights are `σ` of the chosen experts (no bias), optionally
//!   renormalised to sum to 1, then times a scaling factor.
//!
//! gpt-oss's experts ([`MoeExperts`], MXFP4) compute
//!
//! ```text
//! gu   = x · gate_upᵀ + gate_up_bias          // [n, 2·I], gate = gu[.., 0::2], up = gu[.., 1::2]
//! gate = min(gate, limit);  up = clamp(up, −limit, limit)
//! h    = (up + 1) · gate · σ(alpha · gate)     // [n, I]
//! y    = h · downᵀ + down_bias                 // [n, H]
//! out[token] += routing_weight · y             // experts visited in increasing index order
//! ```
//!
//! Weight layouts are those of [`super::mxfp4`] stacked over experts: `gate_up_blocks [E, 2I, H/32,
//! 16]`, `gate_up_scales [E, 2I, H/32]`, `down_blocks [E, H, I/32, 16]`, `down_scales [E, H, I/32]`;
//! biases are f32 `[E, 2I]` and `[E, H]`.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::act_stats::ExpertTaps;
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
    check_router(logits, tokens, experts, top_k)?;
    let mut indices = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut order: Vec<u32> = Vec::with_capacity(experts);
    for row in logits.chunks_exact(experts) {
        top_k_of(row, top_k, &mut order);
        let max = row[order[0] as usize];
        let exps: Vec<f32> = order
            .iter()
            .map(|&e| (row[e as usize] - max).exp())
            .collect();
        let sum: f32 = exps.iter().sum();
        indices.extend_from_slice(&order);
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

/// The `top_k` highest entries of `row` (ties: lower index first; NaN last), in descending order.
fn top_k_of(row: &[f32], top_k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..row.len() as u32);
    // Stable sort keeps the lower index first among equal values.
    order.sort_by(|&a, &b| {
        let (la, lb) = (row[a as usize], row[b as usize]);
        lb.partial_cmp(&la)
            .unwrap_or_else(|| la.is_nan().cmp(&lb.is_nan()))
    });
    order.truncate(top_k);
}

fn check_router(logits: &[f32], tokens: usize, experts: usize, top_k: usize) -> Result<()> {
    if top_k == 0 || top_k > experts {
        candle_core::bail!("moe: top_k {top_k} must be between 1 and the expert count {experts}");
    }
    if logits.len() != tokens * experts {
        candle_core::bail!(
            "moe: router logits hold {} values, expected {tokens}×{experts}",
            logits.len()
        );
    }
    Ok(())
}

/// How a sigmoid router turns scores into weights (Nemotron-H: `norm_topk_prob`,
/// `routed_scaling_factor`, `e_score_correction_bias`).
#[derive(Debug, Clone, PartialEq)]
pub struct SigmoidRouter {
    pub top_k: usize,
    /// Added to `σ(logits)` for the choice only; `[experts]`.
    pub correction_bias: Vec<f32>,
    /// Divide the chosen weights by their sum (+1e-20).
    pub normalize: bool,
    pub scale: f32,
}

/// Top-k of each row of `logits [tokens, experts]` (f32) by `σ(logit) + bias`, weighted by
/// `σ(logit)` (renormalised and scaled as `router` says).
pub fn route_sigmoid_biased(
    logits: &[f32],
    tokens: usize,
    router: &SigmoidRouter,
) -> Result<Routing> {
    let experts = router.correction_bias.len();
    let top_k = router.top_k;
    check_router(logits, tokens, experts, top_k)?;
    let mut indices = Vec::with_capacity(tokens * top_k);
    let mut weights = Vec::with_capacity(tokens * top_k);
    let mut order = Vec::with_capacity(experts);
    let mut scores = vec![0f32; experts];
    let mut choice = vec![0f32; experts];
    for row in logits.chunks_exact(experts) {
        for ((s, c), (&l, &b)) in scores
            .iter_mut()
            .zip(choice.iter_mut())
            .zip(row.iter().zip(&router.correction_bias))
        {
            *s = 1.0 / (1.0 + (-l).exp());
            *c = *s + b;
        }
        top_k_of(&choice, top_k, &mut order);
        let chosen: Vec<f32> = order.iter().map(|&e| scores[e as usize]).collect();
        let denom = if router.normalize {
            chosen.iter().sum::<f32>() + 1e-20
        } else {
            1.0
        };
        indices.extend_from_slice(&order);
        weights.extend(chosen.iter().map(|w| w / denom * router.scale));
    }
    Ok(Routing {
        top_k,
        indices,
        weights,
    })
}

/// One layer's routed experts as the dispatch sees them: `run(e, xs, n, out)` computes expert
/// `e` on `xs [n, hidden]` into `out [n, hidden]` (overwritten).
pub trait ExpertFfn: Sync {
    fn experts(&self) -> usize;
    fn hidden(&self) -> usize;
    fn run(&self, expert: usize, xs: &[f32], n: usize, out: &mut [f32]) -> Result<()>;
}

/// Runs the routed experts on `x [tokens, hidden]` and writes `Σ_k weight_k · expert_k(x)` to
/// `out [tokens, hidden]` (overwritten). Only experts named in `routing` run, each once.
pub fn dispatch(
    x: &[f32],
    routing: &Routing,
    tokens: usize,
    ffn: &dyn ExpertFfn,
    out: &mut [f32],
) -> Result<()> {
    let h = ffn.hidden();
    if x.len() != tokens * h
        || out.len() != tokens * h
        || routing.indices.len() != tokens * routing.top_k
    {
        candle_core::bail!(
            "moe: activations, output or routing do not match {tokens} tokens of {h} features"
        );
    }
    if let Some(&bad) = routing
        .indices
        .iter()
        .find(|&&e| e as usize >= ffn.experts())
    {
        candle_core::bail!(
            "moe: routing names expert {bad}, the layer has {}",
            ffn.experts()
        );
    }
    out.fill(0.0);
    for (e, members) in group_by_expert(routing, ffn.experts()) {
        let n = members.len();
        let mut xs = Vec::with_capacity(n * h);
        for &(t, _) in &members {
            xs.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut y = vec![0f32; n * h];
        ffn.run(e, &xs, n, &mut y)?;
        for (row, &(t, weight)) in y.chunks_exact(h).zip(&members) {
            let dst = &mut out[t * h..(t + 1) * h];
            for (d, v) in dst.iter_mut().zip(row) {
                *d += weight * v;
            }
        }
    }
    Ok(())
}

/// `relu(x)²` in place (Nemotron-H's ungated experts, transformers' `relu2`).
pub fn relu_squared(values: &mut [f32]) {
    for v in values {
        let r = v.max(0.0);
        *v = r * r;
    }
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
    dispatch(x, routing, tokens, w, out)
}

/// gpt-oss's MXFP4 SwiGLU experts (biases included in each expert's output): on CPUs with
/// AVX-512 VNNI/VBMI the integer-activation kernel [`super::mxfp4_int`] (f32-level rounding, see
/// its module doc), elsewhere the f32 kernel. Why not the integer kernel's AVX2 form: a token's
/// result there was not independent of the batch (tests/batching.rs failed on the gpt-oss fixture
/// with `XLLM_NO_AVX512=1`); until that is found, AVX2 CPUs keep the kernel that is.
impl ExpertFfn for MoeWeightsRef<'_> {
    fn experts(&self) -> usize {
        self.experts
    }

    fn hidden(&self) -> usize {
        self.hidden
    }

    fn run(&self, e: usize, xs: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.run_expert(e, xs, n, y, None)
    }
}

/// [`MoeWeightsRef`] whose expert inputs are recorded (`xllm imatrix`): each expert's rows, those
/// of the tokens routed to it, go to its matrix of the expert tensors.
struct TappedMoe<'a> {
    weights: MoeWeightsRef<'a>,
    taps: &'a ExpertTaps,
}

impl ExpertFfn for TappedMoe<'_> {
    fn experts(&self) -> usize {
        self.weights.experts
    }

    fn hidden(&self) -> usize {
        self.weights.hidden
    }

    fn run(&self, e: usize, xs: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.weights.run_expert(e, xs, n, y, Some(self.taps))
    }
}

impl MoeWeightsRef<'_> {
    /// Expert `e` on `xs [n, hidden]` → `y [n, hidden]`; `taps` records the inputs of gate/up
    /// and of down.
    fn run_expert(
        &self,
        e: usize,
        xs: &[f32],
        n: usize,
        y: &mut [f32],
        taps: Option<&ExpertTaps>,
    ) -> Result<()> {
        let (h, i) = (self.hidden, self.intermediate);
        if let Some(t) = taps {
            t.input.record_rows(e, xs, h)?;
        }
        let gu_block_bytes = 2 * i * h / BLOCK_VALUES * BLOCK_BYTES;
        let gu_scale_bytes = 2 * i * h / BLOCK_VALUES;
        let dn_block_bytes = h * i / BLOCK_VALUES * BLOCK_BYTES;
        let dn_scale_bytes = h * i / BLOCK_VALUES;
        let mut gate_up = vec![0f32; n * 2 * i];
        expert_matmul(
            xs,
            &self.gate_up_blocks[e * gu_block_bytes..(e + 1) * gu_block_bytes],
            &self.gate_up_scales[e * gu_scale_bytes..(e + 1) * gu_scale_bytes],
            n,
            h,
            2 * i,
            &mut gate_up,
        )?;
        let gu_bias = &self.gate_up_bias[e * 2 * i..(e + 1) * 2 * i];
        for row in gate_up.chunks_exact_mut(2 * i) {
            row.iter_mut().zip(gu_bias).for_each(|(v, b)| *v += b);
        }
        let mut act = vec![0f32; n * i];
        clamped_swiglu(&gate_up, self.swiglu, &mut act);
        if let Some(t) = taps {
            t.hidden.record_rows(e, &act, i)?;
        }
        expert_matmul(
            &act,
            &self.down_blocks[e * dn_block_bytes..(e + 1) * dn_block_bytes],
            &self.down_scales[e * dn_scale_bytes..(e + 1) * dn_scale_bytes],
            n,
            i,
            h,
            y,
        )?;
        let dn_bias = &self.down_bias[e * h..(e + 1) * h];
        for row in y.chunks_exact_mut(h) {
            row.iter_mut().zip(dn_bias).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }
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
        self.forward_tapped(x, router_logits, None)
    }

    /// [`MoeExperts::forward`], recording each expert's inputs through `taps` when set (CPU
    /// only: `xllm imatrix` runs there).
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        router_logits: &Tensor,
        taps: Option<&ExpertTaps>,
    ) -> Result<Tensor> {
        x.apply_op2_no_bwd(
            router_logits,
            &MoeOp {
                experts: self,
                taps,
            },
        )
    }
}

/// The candle op: `(x, router_logits)` in, experts carried by the op.
pub struct MoeOp<'a> {
    pub experts: &'a MoeExperts,
    /// Where expert inputs are recorded (`xllm imatrix`); `None` on the normal path.
    pub taps: Option<&'a ExpertTaps>,
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
        match self.taps {
            None => moe_cpu(&x, &routing, tokens, &m.as_ref(), &mut out)?,
            Some(taps) => {
                let weights = m.as_ref();
                weights.check()?;
                dispatch(&x, &routing, tokens, &TappedMoe { weights, taps }, &mut out)?
            }
        }
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
        if self.taps.is_some() {
            candle_core::bail!("expert activation statistics are collected on the CPU only");
        }
        super::cuda::moe_op_cuda_fwd(self.experts, (s1, l1), (s2, l2))
    }
}

/// The experts' MXFP4 matmul for this CPU (see [`MoeWeightsRef`]'s `ExpertFfn`).
fn expert_matmul(
    x: &[f32],
    blocks: &[u8],
    scales: &[u8],
    tokens: usize,
    in_features: usize,
    out_features: usize,
    out: &mut [f32],
) -> Result<()> {
    if super::mxfp4_int::has_fast_kernel() {
        super::mxfp4_int::mxfp4_int_matmul_cpu(
            x,
            blocks,
            scales,
            tokens,
            in_features,
            out_features,
            out,
        )
    } else {
        mxfp4::mxfp4_matmul_cpu(x, blocks, scales, tokens, in_features, out_features, out)
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
    fn sigmoid_router_chooses_with_bias_and_weighs_without() {
        // Scores σ(l): expert 0 is best by score, but the bias makes 2 and 3 the choice.
        let logits = [2.0f32, 0.0, -1.0, 0.5];
        let router = SigmoidRouter {
            top_k: 2,
            correction_bias: vec![0.0, 0.0, 1.0, 0.5],
            normalize: true,
            scale: 2.5,
        };
        let r = route_sigmoid_biased(&logits, 1, &router).unwrap();
        assert_eq!(r.indices, vec![2, 3]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (a, b) = (s(-1.0), s(0.5));
        assert!((r.weights[0] - 2.5 * a / (a + b)).abs() < 1e-6);
        assert!((r.weights[1] - 2.5 * b / (a + b)).abs() < 1e-6);
        let plain = SigmoidRouter {
            normalize: false,
            scale: 1.0,
            ..router
        };
        let r = route_sigmoid_biased(&logits, 1, &plain).unwrap();
        assert!((r.weights[0] - a).abs() < 1e-7 && (r.weights[1] - b).abs() < 1e-7);
    }

    /// An expert `e` that scales its input by `e + 1` and counts how often it ran.
    struct Scaling {
        runs: std::sync::Mutex<Vec<usize>>,
    }

    impl ExpertFfn for Scaling {
        fn experts(&self) -> usize {
            4
        }
        fn hidden(&self) -> usize {
            2
        }
        fn run(&self, e: usize, xs: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
            assert_eq!(xs.len(), n * 2);
            self.runs.lock().unwrap().push(e);
            for (o, x) in out.iter_mut().zip(xs) {
                *o = x * (e + 1) as f32;
            }
            Ok(())
        }
    }

    #[test]
    fn dispatch_runs_each_active_expert_once_and_weighs_outputs() {
        let ffn = Scaling {
            runs: Default::default(),
        };
        let x = [1.0, 2.0, -1.0, 0.5];
        let routing = Routing {
            top_k: 2,
            indices: vec![1, 3, 3, 0],
            weights: vec![0.5, 0.25, 1.0, 2.0],
        };
        let mut out = [9f32; 4];
        dispatch(&x, &routing, 2, &ffn, &mut out).unwrap();
        assert_eq!(
            *ffn.runs.lock().unwrap(),
            vec![0, 1, 3],
            "expert 2 never runs"
        );
        // Token 0: 0.5·2x + 0.25·4x = 2x; token 1: 1.0·4x + 2.0·1x = 6x.
        assert_eq!(out, [2.0, 4.0, -6.0, 3.0]);
        let bad = Routing {
            top_k: 1,
            indices: vec![7, 0],
            weights: vec![1.0, 1.0],
        };
        assert!(dispatch(&x, &bad, 2, &ffn, &mut out).is_err());
        let mut v = [-2.0, 0.0, 3.0];
        relu_squared(&mut v);
        assert_eq!(v, [0.0, 0.0, 9.0]);
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
