//! Nemotron-H (`model_type: nemotron_h`, NVIDIA Nemotron 3 Nano): a hybrid of Mamba2 mixers (`M`),
//! mixture-of-experts feed-forwards (`E`), attention without positional encoding (`*`) and dense
//! MLPs (`-`), one per block as `hybrid_override_pattern` lists them. Every block is
//! `x + mixer(rms_norm(x))`; then `norm_f` and an untied `lm_head`.
//!
//! Semantics follow transformers' `modeling_nemotron_h.py` (torch path, our fixtures' reference):
//! - Mamba2 (see [`crate::kernels::ssm`]): `in_proj` → `z | xBC | dt`; causal depthwise conv1d +
//!   SiLU over `xBC` → `x | B | C`; the selective scan with `dt = max(softplus(dt + dt_bias),
//!   time_step_min)`, `A = −exp(A_log)`, `D` skip, groups of heads sharing `B`/`C`; the grouped
//!   gated RMSNorm (`y · silu(z)` normalised per group of `d_inner / n_groups`); `out_proj`.
//! - Attention: q/k/v/o without bias, GQA, scale `head_dim^-0.5`, causal, **no RoPE**.
//! - MoE: fp32 router `σ(x·Wᵀ)`, top-k by `σ + e_score_correction_bias`, weights `σ` of the chosen
//!   (renormalised when `norm_topk_prob`) × `routed_scaling_factor`; ungated `relu²` experts, plus
//!   one shared `relu²` expert on the same input.
//!
//! Per-sequence state ([`crate::state::SequenceState`], one slot per Mamba or attention block in
//! block order): a Mamba layer keeps a [`crate::state::RecurrentState`] of two f32 buffers, the conv
//! window `[kernel − 1, conv_dim]` and the SSM state `[heads, head_dim, state]`; an attention layer
//! keeps keys/values. A recurrent state summarises every token it has read, so it cannot be rewound
//! to an earlier position: the engine snapshots it at block boundaries, and a prefix is shared (or
//! a rewind lands) only where a snapshot was taken (see docs/architecture.md).

use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, D};
use serde_json::Value;

use super::bf16_linear::Bf16Matrix;
use super::llama::{Linear, Weight};
use super::mask::causal_mask;
use super::{BatchPlan, BatchSeq, BuildOptions, CausalLm, ModelInfo, StateSlot, WeightSource};
use crate::kernels::act_stats::Tap;
use crate::kernels::moe::{self, ExpertFfn, SigmoidRouter};
use crate::kernels::ssm::{CausalConv1d, GatedGroupNorm, ScanInput, SsmScan};
use crate::model::safetensors::SafetensorsWeights;

/// One block's mixer kind, as the pattern letters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `M`: Mamba2 mixer.
    Mamba,
    /// `*`: attention.
    Attention,
    /// `E`: mixture of experts.
    Moe,
    /// `-`: dense MLP.
    Mlp,
}

impl LayerKind {
    fn from_letter(c: char) -> Option<Self> {
        Some(match c {
            'M' => Self::Mamba,
            '*' => Self::Attention,
            'E' => Self::Moe,
            '-' => Self::Mlp,
            _ => return None,
        })
    }

    /// transformers' list spellings, old (`mamba`, `attention`) and new (`linear_attention`,
    /// `full_attention`).
    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "mamba" | "linear_attention" | "M" => Self::Mamba,
            "attention" | "full_attention" | "*" => Self::Attention,
            "moe" | "E" => Self::Moe,
            "mlp" | "-" => Self::Mlp,
            _ => return None,
        })
    }

    pub fn letter(self) -> char {
        match self {
            Self::Mamba => 'M',
            Self::Attention => '*',
            Self::Moe => 'E',
            Self::Mlp => '-',
        }
    }
}

/// The fields of `config.json` Nemotron-H needs (shipped spellings plus transformers' aliases).
#[derive(Debug, Clone)]
pub struct NemotronHConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: Vec<LayerKind>,
    pub eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    // Mamba2.
    pub mamba_heads: usize,
    pub mamba_head_dim: usize,
    pub n_groups: usize,
    pub ssm_state: usize,
    pub conv_kernel: usize,
    pub chunk_size: usize,
    pub conv_bias: bool,
    pub proj_bias: bool,
    pub time_step_min: f64,
    // Attention.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    // MoE and MLP.
    pub experts: usize,
    pub top_k: usize,
    pub moe_intermediate: usize,
    pub shared_intermediate: usize,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub mlp_intermediate: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn config_error(msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("nemotron_h config.json: {msg}")
}

impl NemotronHConfig {
    pub fn from_value(v: &Value) -> anyhow::Result<Self> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()));
        let usize_of = |keys: &[&str], default: Option<usize>| -> anyhow::Result<usize> {
            match get(keys) {
                Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                    config_error(format!("`{}` must be a non-negative integer", keys[0]))
                }),
                None => default.ok_or_else(|| config_error(format!("`{}` is missing", keys[0]))),
            }
        };
        let f64_of = |keys: &[&str], default: f64| -> anyhow::Result<f64> {
            match get(keys) {
                Some(x) => x
                    .as_f64()
                    .ok_or_else(|| config_error(format!("`{}` must be a number", keys[0]))),
                None => Ok(default),
            }
        };
        let bool_of = |keys: &[&str], default: bool| -> bool {
            get(keys).and_then(Value::as_bool).unwrap_or(default)
        };
        let str_of = |keys: &[&str]| get(keys).and_then(Value::as_str);

        let layers = if let Some(p) = str_of(&["hybrid_override_pattern"]) {
            p.chars()
                .map(|c| {
                    LayerKind::from_letter(c).ok_or_else(|| {
                        config_error(format!(
                            "hybrid_override_pattern has '{c}'; expected M (Mamba2), E (MoE), * (attention) or - (MLP)"
                        ))
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        } else if let Some(list) =
            get(&["layers_block_type", "layer_types"]).and_then(Value::as_array)
        {
            list.iter()
                .map(|t| {
                    let name = t.as_str().unwrap_or("");
                    LayerKind::from_name(name).ok_or_else(|| {
                        config_error(format!(
                            "layers_block_type has '{name}'; expected mamba, moe, attention or mlp"
                        ))
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        } else {
            return Err(config_error(
                "neither `hybrid_override_pattern` nor `layers_block_type` says what the layers are",
            ));
        };
        if layers.is_empty() {
            return Err(config_error("the layer pattern is empty"));
        }
        let hidden_size = usize_of(&["hidden_size"], None)?;
        let heads = usize_of(&["num_attention_heads"], Some(1))?;
        let eos_token_ids = match get(&["eos_token_id"]) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => Vec::new(),
        };
        let cfg = Self {
            vocab_size: usize_of(&["vocab_size"], None)?,
            hidden_size,
            eps: f64_of(&["layer_norm_epsilon", "norm_eps", "rms_norm_eps"], 1e-5)?,
            max_position_embeddings: usize_of(&["max_position_embeddings"], Some(4096))?,
            tie_word_embeddings: bool_of(&["tie_word_embeddings"], false),
            mamba_heads: usize_of(&["mamba_num_heads"], Some(128))?,
            mamba_head_dim: usize_of(&["mamba_head_dim"], Some(64))?,
            n_groups: usize_of(&["n_groups", "mamba_n_groups"], Some(8))?,
            ssm_state: usize_of(&["ssm_state_size"], Some(128))?,
            conv_kernel: usize_of(&["conv_kernel", "mamba_d_conv"], Some(4))?,
            chunk_size: usize_of(&["chunk_size", "mamba_chunk_size"], Some(128))?,
            conv_bias: bool_of(&["use_conv_bias", "mamba_conv_bias"], true),
            proj_bias: bool_of(&["use_bias"], false),
            time_step_min: f64_of(&["time_step_min", "mamba_dt_min"], 0.001)?,
            heads,
            kv_heads: usize_of(&["num_key_value_heads"], Some(heads))?,
            head_dim: usize_of(
                &["head_dim", "attention_head_dim"],
                Some(hidden_size / heads.max(1)),
            )?,
            experts: usize_of(&["n_routed_experts", "num_local_experts"], Some(8))?,
            top_k: usize_of(&["num_experts_per_tok"], Some(2))?,
            moe_intermediate: usize_of(&["moe_intermediate_size"], Some(7688))?,
            shared_intermediate: usize_of(&["moe_shared_expert_intermediate_size"], Some(7688))?,
            routed_scaling_factor: f64_of(&["routed_scaling_factor"], 1.0)?,
            norm_topk_prob: bool_of(&["norm_topk_prob"], true),
            mlp_intermediate: usize_of(&["intermediate_size"], Some(21504))?,
            bos_token_id: get(&["bos_token_id"])
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
            layers,
        };
        // What transformers would do differently from us is refused, not approximated.
        if let Some(act) = str_of(&["mamba_hidden_act"]).filter(|a| !matches!(*a, "silu" | "swish"))
        {
            return Err(config_error(format!(
                "mamba_hidden_act '{act}' is not supported (silu)"
            )));
        }
        if let Some(act) = str_of(&["mlp_hidden_act"]).filter(|a| *a != "relu2") {
            return Err(config_error(format!(
                "mlp_hidden_act '{act}' is not supported (relu2)"
            )));
        }
        if bool_of(&["mlp_bias"], false) {
            return Err(config_error("mlp_bias true is not supported"));
        }
        if get(&["moe_latent_size"]).is_some() {
            return Err(config_error(
                "moe_latent_size (latent expert projections) is not supported",
            ));
        }
        if usize_of(&["n_group"], Some(1))? != 1 || usize_of(&["topk_group"], Some(1))? != 1 {
            return Err(config_error(
                "group-limited routing (n_group/topk_group > 1) is not supported",
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let has = |k: LayerKind| self.layers.contains(&k);
        if has(LayerKind::Mamba) {
            if self.n_groups == 0 || self.mamba_heads % self.n_groups != 0 {
                return Err(config_error(format!(
                    "mamba_num_heads {} must be a positive multiple of n_groups {}",
                    self.mamba_heads, self.n_groups
                )));
            }
            if self.conv_kernel == 0
                || self.chunk_size == 0
                || self.ssm_state == 0
                || self.mamba_head_dim == 0
            {
                return Err(config_error(
                    "conv_kernel, chunk_size, ssm_state_size and mamba_head_dim must be positive",
                ));
            }
        }
        if has(LayerKind::Attention)
            && (self.heads == 0
                || self.kv_heads == 0
                || self.heads % self.kv_heads != 0
                || self.head_dim == 0)
        {
            return Err(config_error(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.heads, self.kv_heads
            )));
        }
        if has(LayerKind::Moe) && (self.top_k == 0 || self.top_k > self.experts) {
            return Err(config_error(format!(
                "num_experts_per_tok {} must be between 1 and n_routed_experts {}",
                self.top_k, self.experts
            )));
        }
        Ok(())
    }

    pub fn d_inner(&self) -> usize {
        self.mamba_heads * self.mamba_head_dim
    }

    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_groups * self.ssm_state
    }

    /// `in_proj` output width: `z | xBC | dt`.
    pub fn in_proj_dim(&self) -> usize {
        self.d_inner() + self.conv_dim() + self.mamba_heads
    }

    pub fn count(&self, kind: LayerKind) -> usize {
        self.layers.iter().filter(|k| **k == kind).count()
    }

    /// The pattern as letters (`MEMEM*E…`).
    pub fn pattern(&self) -> String {
        self.layers.iter().map(|k| k.letter()).collect()
    }

    /// f32 values of recurrent state one sequence holds in one Mamba layer (conv + SSM).
    pub fn mamba_state_values(&self) -> usize {
        (self.conv_kernel - 1) * self.conv_dim() + self.d_inner() * self.ssm_state
    }

    /// Bytes of recurrent state per sequence (every Mamba layer; independent of its length).
    pub fn state_bytes_per_sequence(&self) -> u64 {
        (self.count(LayerKind::Mamba) * self.mamba_state_values() * 4) as u64
    }

    /// `(total, active)` parameter counts from the shapes. Active = what one token computes with
    /// (as for gpt-oss): `top_k` routed experts per MoE layer, and not the input embedding table
    /// (a token reads one row of it); the output head is counted. Nemotron 3 Nano: 31.6B / 3.2B.
    pub fn parameter_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let (di, cd, ip) = (
            self.d_inner() as u64,
            self.conv_dim() as u64,
            self.in_proj_dim() as u64,
        );
        let nh = self.mamba_heads as u64;
        let k = self.conv_kernel as u64;
        let pb = if self.proj_bias { ip + h } else { 0 };
        let cb = if self.conv_bias { cd } else { 0 };
        let mamba = ip * h + cd * k + cb + 3 * nh + di + di * h + pb;
        let (ah, akv, ahd) = (
            self.heads as u64,
            self.kv_heads as u64,
            self.head_dim as u64,
        );
        let attn = 2 * h * ah * ahd + 2 * h * akv * ahd;
        let (e, i, s) = (
            self.experts as u64,
            self.moe_intermediate as u64,
            self.shared_intermediate as u64,
        );
        let expert = 2 * h * i;
        let moe_dense = e * h + e + 2 * h * s;
        let mlp = 2 * h * self.mlp_intermediate as u64;
        let (mut total, mut active) = (0u64, 0u64);
        for kind in &self.layers {
            let (t, a) = match kind {
                LayerKind::Mamba => (mamba, mamba),
                LayerKind::Attention => (attn, attn),
                LayerKind::Moe => (
                    moe_dense + e * expert,
                    moe_dense + self.top_k as u64 * expert,
                ),
                LayerKind::Mlp => (mlp, mlp),
            };
            total += t + h;
            active += a + h;
        }
        let v = self.vocab_size as u64;
        let head = v * h;
        let embedding = if self.tie_word_embeddings { 0 } else { v * h };
        (total + h + head + embedding, active + h + head)
    }
}

struct MambaMixer {
    in_proj: Linear,
    conv: CausalConv1d,
    scan: SsmScan,
    norm: GatedGroupNorm,
    out_proj: Linear,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

/// relu² feed-forward `down(relu(up(x))²)`.
struct Relu2Mlp {
    up: Linear,
    down: Linear,
}

impl Relu2Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.up.forward(x)?.relu()?;
        self.down.forward(&u.sqr()?)
    }

    /// On rows of a slice (the MoE dispatch's expert call).
    fn run_rows(&self, xs: &[f32], n: usize, hidden: usize, out: &mut [f32]) -> Result<()> {
        let x = Tensor::from_slice(xs, (n, hidden), &Device::Cpu)?;
        let mut u: Vec<f32> = self.up.forward(&x)?.flatten_all()?.to_vec1()?;
        moe::relu_squared(&mut u);
        let cols = u.len() / n.max(1);
        let y = self
            .down
            .forward(&Tensor::from_vec(u, (n, cols), &Device::Cpu)?)?;
        out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}

/// The routed experts of one MoE layer, for [`moe::dispatch`].
struct Relu2Experts {
    experts: Vec<Relu2Mlp>,
    hidden: usize,
}

impl ExpertFfn for Relu2Experts {
    fn experts(&self) -> usize {
        self.experts.len()
    }

    fn hidden(&self) -> usize {
        self.hidden
    }

    fn run(&self, e: usize, xs: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        self.experts[e].run_rows(xs, n, self.hidden, out)
    }
}

struct MoeBlock {
    /// Router weight `[experts, hidden]` in f32 (transformers computes the router in f32).
    router: Tensor,
    /// `xllm imatrix` only: where the router's input is recorded.
    router_tap: Option<Tap>,
    routing: SigmoidRouter,
    experts: Relu2Experts,
    shared: Relu2Mlp,
}

enum Mixer {
    Mamba(Box<MambaMixer>),
    Attention(Attention),
    Moe(Box<MoeBlock>),
    Mlp(Relu2Mlp),
}

struct Block {
    norm: Tensor,
    mixer: Mixer,
    /// The block's slot in a sequence's state (Mamba and attention blocks keep state).
    slot: Option<usize>,
}

/// A loaded Nemotron-H model.
pub struct NemotronH {
    pub config: NemotronHConfig,
    info: ModelInfo,
    embed: Weight,
    blocks: Vec<Block>,
    norm_f: Tensor,
    lm_head: Linear,
}

/// Reads a `[rows, cols]` matrix: bf16 kept as stored through our kernel on the CPU (pages of
/// the mapping released once copied), else converted to the compute dtype.
fn load_matrix(
    weights: &SafetensorsWeights,
    name: &str,
    shape: [usize; 2],
    options: &BuildOptions,
) -> anyhow::Result<Weight> {
    let stored = weights.stored_dtype(name)?;
    if options.keep_weight_dtype && stored == DType::BF16 && options.device.is_cpu() {
        let raw = weights.raw(name)?;
        if raw.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, expected {shape:?} from config.json",
                raw.shape
            );
        }
        let m = Bf16Matrix::from_le_bytes(raw.data, shape[0], shape[1])?;
        weights.release_pages(name);
        return Ok(Weight::Bf16(Arc::new(m)));
    }
    Ok(Weight::Dense(weights.load_shaped(
        name,
        &shape,
        options.dtype,
        &options.device,
    )?))
}

fn f32_values(weights: &SafetensorsWeights, name: &str, len: usize) -> anyhow::Result<Vec<f32>> {
    let t = weights.load(name, DType::F32, &Device::Cpu)?;
    if t.elem_count() != len {
        bail!(
            "tensor '{name}' has shape {:?}, expected {len} values from config.json",
            t.dims()
        );
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

impl NemotronH {
    pub fn from_weights(
        config: &Value,
        weights: &SafetensorsWeights,
        options: &BuildOptions,
    ) -> anyhow::Result<Self> {
        let c = NemotronHConfig::from_value(config)?;
        if !options.device.is_cpu() {
            bail!("nemotron_h runs on the CPU only for now (its Mamba2 kernels have no GPU version yet); use --device cpu");
        }
        let h = c.hidden_size;
        let stats = options.activation_stats.as_ref();
        // `xllm imatrix`: a projection's inputs are recorded under llama.cpp's GGUF name
        // (`blk.N.<gguf>.weight`); an expert's under its matrix of the 3-D expert tensor.
        let tap = |l: usize, gguf: &str| {
            stats.map(|s| Tap::new(s, vec![format!("blk.{l}.{gguf}.weight")]))
        };
        let expert_tap = |l: usize, gguf: &str, x: usize| {
            stats.map(|s| Tap::expert(s, vec![format!("blk.{l}.{gguf}.weight")], c.experts, x))
        };
        let linear = |name: &str, rows: usize, cols: usize, bias: bool| -> anyhow::Result<Linear> {
            let w = load_matrix(weights, &format!("{name}.weight"), [rows, cols], options)?;
            let b = if bias {
                Some(weights.load_shaped(
                    &format!("{name}.bias"),
                    &[rows],
                    DType::F32,
                    &options.device,
                )?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let vector = |name: &str, len: usize| -> anyhow::Result<Tensor> {
            weights.load_shaped(name, &[len], DType::F32, &options.device)
        };
        let mut blocks = Vec::with_capacity(c.layers.len());
        let mut state_slots = Vec::new();
        for (l, kind) in c.layers.iter().enumerate() {
            let p = format!("backbone.layers.{l}");
            let m = format!("{p}.mixer");
            let missing = |what: &str| format!("layer {l} ({}) has no '{m}.{what}'", kind.letter());
            let mixer = match kind {
                LayerKind::Mamba => {
                    let (cd, di, nh) = (c.conv_dim(), c.d_inner(), c.mamba_heads);
                    let conv_w =
                        f32_values(weights, &format!("{m}.conv1d.weight"), cd * c.conv_kernel)
                            .with_context(|| missing("conv1d.weight"))?;
                    let conv_b = if c.conv_bias {
                        Some(f32_values(weights, &format!("{m}.conv1d.bias"), cd)?)
                    } else {
                        None
                    };
                    let a_log = f32_values(weights, &format!("{m}.A_log"), nh)?;
                    Mixer::Mamba(Box::new(MambaMixer {
                        in_proj: linear(&format!("{m}.in_proj"), c.in_proj_dim(), h, c.proj_bias)?
                            .with_tap(tap(l, "ssm_in")),
                        conv: CausalConv1d::new(&conv_w, conv_b.as_deref(), cd, c.conv_kernel)?,
                        scan: SsmScan {
                            heads: nh,
                            head_dim: c.mamba_head_dim,
                            groups: c.n_groups,
                            state: c.ssm_state,
                            a: a_log.iter().map(|v| -v.exp()).collect(),
                            d: f32_values(weights, &format!("{m}.D"), nh)?,
                            dt_bias: f32_values(weights, &format!("{m}.dt_bias"), nh)?,
                            dt_min: c.time_step_min as f32,
                            chunk: c.chunk_size,
                        },
                        norm: GatedGroupNorm {
                            weight: f32_values(weights, &format!("{m}.norm.weight"), di)?,
                            group_size: di / c.n_groups,
                            eps: c.eps as f32,
                        },
                        out_proj: linear(&format!("{m}.out_proj"), h, di, c.proj_bias)?
                            .with_tap(tap(l, "ssm_out")),
                    }))
                }
                LayerKind::Attention => {
                    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
                    Mixer::Attention(Attention {
                        q: linear(&format!("{m}.q_proj"), q, h, false)?.with_tap(tap(l, "attn_q")),
                        k: linear(&format!("{m}.k_proj"), kv, h, false)?.with_tap(tap(l, "attn_k")),
                        v: linear(&format!("{m}.v_proj"), kv, h, false)?.with_tap(tap(l, "attn_v")),
                        o: linear(&format!("{m}.o_proj"), h, q, false)?
                            .with_tap(tap(l, "attn_output")),
                    })
                }
                LayerKind::Moe => {
                    let (e, i, s) = (c.experts, c.moe_intermediate, c.shared_intermediate);
                    let router = weights
                        .load_shaped(
                            &format!("{m}.gate.weight"),
                            &[e, h],
                            DType::F32,
                            &Device::Cpu,
                        )
                        .with_context(|| missing("gate.weight"))?;
                    let bias_name = format!("{m}.gate.e_score_correction_bias");
                    let correction_bias = if weights.contains(&bias_name) {
                        f32_values(weights, &bias_name, e)?
                    } else {
                        vec![0.0; e]
                    };
                    let experts = (0..e)
                        .map(|x| {
                            Ok(Relu2Mlp {
                                up: linear(&format!("{m}.experts.{x}.up_proj"), i, h, false)?
                                    .with_tap(expert_tap(l, "ffn_up_exps", x)),
                                down: linear(&format!("{m}.experts.{x}.down_proj"), h, i, false)?
                                    .with_tap(expert_tap(l, "ffn_down_exps", x)),
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    Mixer::Moe(Box::new(MoeBlock {
                        router,
                        router_tap: tap(l, "ffn_gate_inp"),
                        routing: SigmoidRouter {
                            top_k: c.top_k,
                            correction_bias,
                            normalize: c.norm_topk_prob,
                            scale: c.routed_scaling_factor as f32,
                        },
                        experts: Relu2Experts { experts, hidden: h },
                        shared: Relu2Mlp {
                            up: linear(&format!("{m}.shared_experts.up_proj"), s, h, false)?
                                .with_tap(tap(l, "ffn_up_shexp")),
                            down: linear(&format!("{m}.shared_experts.down_proj"), h, s, false)?
                                .with_tap(tap(l, "ffn_down_shexp")),
                        },
                    }))
                }
                LayerKind::Mlp => Mixer::Mlp(Relu2Mlp {
                    up: linear(&format!("{m}.up_proj"), c.mlp_intermediate, h, false)?
                        .with_tap(tap(l, "ffn_up")),
                    down: linear(&format!("{m}.down_proj"), h, c.mlp_intermediate, false)?
                        .with_tap(tap(l, "ffn_down")),
                }),
            };
            let slot = match mixer {
                Mixer::Mamba(_) => Some(StateSlot::Recurrent(vec![
                    (c.conv_kernel - 1) * c.conv_dim(),
                    c.d_inner() * c.ssm_state,
                ])),
                Mixer::Attention(_) => Some(StateSlot::Kv),
                Mixer::Moe(_) | Mixer::Mlp(_) => None,
            }
            .map(|slot| {
                state_slots.push(slot);
                state_slots.len() - 1
            });
            blocks.push(Block {
                norm: vector(&format!("{p}.norm.weight"), h)?,
                mixer,
                slot,
            });
        }
        let embed_name = "backbone.embeddings.weight";
        let embed = load_matrix(weights, embed_name, [c.vocab_size, h], options)?;
        let head_name = if c.tie_word_embeddings && !weights.contains("lm_head.weight") {
            embed_name
        } else {
            "lm_head.weight"
        };
        let lm_head = Linear::new(
            load_matrix(weights, head_name, [c.vocab_size, h], options)?,
            None,
        );
        let norm_f = vector("backbone.norm_f.weight", h)?;
        let format = match weights.stored_dtype(embed_name)? {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ => "f32",
        };
        let info = ModelInfo {
            architecture: "nemotron_h".into(),
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
            cache_layers: c.count(LayerKind::Attention),
            state_slots,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            cache_dtype: options.dtype,
            device: options.device.clone(),
            weight_format: format.into(),
        };
        Ok(Self {
            config: c,
            info,
            embed,
            blocks,
            norm_f,
            lm_head,
        })
    }

    /// Block `layer`'s MoE mixer (routed experts + shared expert) on its normalised input `h`
    /// `[tokens, hidden]` (for checks against a reference, layer by layer).
    pub fn moe_mixer(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        match self.blocks.get(layer).map(|b| &b.mixer) {
            Some(Mixer::Moe(m)) => self.moe(m, h),
            _ => candle_core::bail!("layer {layer} is not a MoE layer"),
        }
    }

    /// Every block over the batch's rows (weights applied to all rows at once; conv, scan and
    /// attention per sequence over its own state); the final norm and head on the rows asked for.
    fn run_batch(&self, batch: &mut [BatchSeq<'_>], plan: &BatchPlan) -> Result<Tensor> {
        let c = &self.config;
        let n = plan.tokens.len();
        let ids = Tensor::from_slice(&plan.tokens, n, &Device::Cpu)?;
        let mut x = super::llama::embed(&self.embed, &ids, DType::F32)?;
        for block in &self.blocks {
            let h = rms_norm(&x, &block.norm, c.eps)?;
            let y = match (&block.mixer, block.slot) {
                (Mixer::Mamba(m), Some(slot)) => self.mamba(m, &h, batch, plan, slot)?,
                (Mixer::Attention(a), Some(slot)) => self.attention(a, &h, batch, plan, slot)?,
                (Mixer::Moe(m), _) => self.moe(m, &h)?,
                (Mixer::Mlp(m), _) => m.forward(&h)?,
                _ => candle_core::bail!("internal error: a stateful block without a state slot"),
            };
            x = (x + y)?;
        }
        if plan.logit_rows.is_empty() {
            return Tensor::zeros((0, c.vocab_size), DType::F32, &Device::Cpu);
        }
        let x = if plan.returns_every_row() {
            x
        } else {
            let rows = Tensor::new(plan.logit_rows.as_slice(), &Device::Cpu)?;
            x.index_select(&rows, 0)?
        };
        let x = rms_norm(&x, &self.norm_f, c.eps)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    fn mamba(
        &self,
        m: &MambaMixer,
        h: &Tensor,
        batch: &mut [BatchSeq<'_>],
        plan: &BatchPlan,
        slot: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (di, cd, nh) = (c.d_inner(), c.conv_dim(), c.mamba_heads);
        let width = c.in_proj_dim();
        let proj: Vec<f32> = m.in_proj.forward(h)?.flatten_all()?.to_vec1()?;
        let n = proj.len() / width;
        let mut normed = vec![0f32; n * di];
        for (seq, span) in batch.iter_mut().zip(&plan.spans) {
            let (offset, len) = (span.offset, span.len);
            let rows = &proj[offset * width..(offset + len) * width];
            let [conv_state, ssm_state] = &mut seq.state.recurrent_mut(slot)?.buffers[..] else {
                candle_core::bail!("internal error: a Mamba state holds two buffers");
            };
            let mut xbc = vec![0f32; len * cd];
            m.conv
                .forward(&rows[di..], width, len, conv_state, &mut xbc)?;
            let dt: Vec<f32> = rows
                .chunks_exact(width)
                .flat_map(|r| r[di + cd..di + cd + nh].iter().copied())
                .collect();
            let mut y = vec![0f32; len * di];
            let input = ScanInput {
                xbc: &xbc,
                stride: cd,
                dt: &dt,
                tokens: len,
            };
            m.scan.forward(input, ssm_state, &mut y)?;
            m.norm.forward(
                &y,
                rows,
                width,
                &mut normed[offset * di..(offset + len) * di],
            )?;
        }
        let normed = Tensor::from_vec(normed, (n, di), &Device::Cpu)?;
        m.out_proj.forward(&normed)
    }

    fn attention(
        &self,
        a: &Attention,
        h: &Tensor,
        batch: &mut [BatchSeq<'_>],
        plan: &BatchPlan,
        slot: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.heads, c.kv_heads, c.head_dim);
        let group = nh / nkv;
        let (q_all, k_all, v_all) = (a.q.forward(h)?, a.k.forward(h)?, a.v.forward(h)?);
        let mut outs = Vec::with_capacity(batch.len());
        for (seq, span) in batch.iter_mut().zip(&plan.spans) {
            let (offset, t, start) = (span.offset, span.len, span.start);
            let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
                x.narrow(0, offset, t)?
                    .reshape((t, n, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let q = heads(&q_all, nh)?;
            let k = heads(&k_all, nkv)?.unsqueeze(0)?;
            let v = heads(&v_all, nkv)?.unsqueeze(0)?;
            let (keys, values) = seq.state.kv_mut(slot)?.append(&k, &v)?;
            let keys = keys.squeeze(0)?.to_dtype(DType::F32)?.contiguous()?;
            let values = values.squeeze(0)?.to_dtype(DType::F32)?.contiguous()?;
            let total = keys.dim(1)?;
            if total != start + t {
                candle_core::bail!(
                    "internal error: state slot {slot} holds {total} tokens, expected {}",
                    start + t
                );
            }
            // Heads sharing a KV head are consecutive: fold them into the query axis.
            let q = q.reshape((nkv, group * t, hd))?;
            let scale = (hd as f64).powf(-0.5);
            let scores = (q.matmul(&keys.t()?)? * scale)?.reshape((nh, t, total))?;
            let scores = if t > 1 {
                let mask = causal_mask(start..start + t, 0..total, None, &Device::Cpu, DType::F32)?;
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?.reshape((
                nkv,
                group * t,
                total,
            ))?;
            let out = probs
                .matmul(&values)?
                .reshape((nh, t, hd))?
                .transpose(0, 1)?
                .reshape((t, nh * hd))?;
            outs.push(out);
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        a.o.forward(&out)
    }

    fn moe(&self, m: &MoeBlock, h: &Tensor) -> Result<Tensor> {
        let hidden = self.config.hidden_size;
        if let Some(tap) = &m.router_tap {
            tap.record(h)?;
        }
        let logits: Vec<f32> = h.matmul(&m.router.t()?)?.flatten_all()?.to_vec1()?;
        let n = logits.len() / m.routing.correction_bias.len();
        let routing = moe::route_sigmoid_biased(&logits, n, &m.routing)?;
        let xs: Vec<f32> = h.flatten_all()?.to_vec1()?;
        let mut routed = vec![0f32; n * hidden];
        moe::dispatch(&xs, &routing, n, &m.experts, &mut routed)?;
        let routed = Tensor::from_vec(routed, (n, hidden), &Device::Cpu)?;
        routed + m.shared.forward(h)?
    }
}

impl CausalLm for NemotronH {
    fn forward_batch(&self, batch: &mut [BatchSeq<'_>]) -> Result<Tensor> {
        let plan = BatchPlan::new(batch, self.config.vocab_size, self.info.state_slots.len())?;
        let logits = self.run_batch(batch, &plan)?;
        plan.commit(batch);
        Ok(logits)
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// Registry builder (safetensors only: Nemotron-H ships no GGUF we read).
pub fn build(
    source: &WeightSource<'_>,
    options: &BuildOptions,
) -> anyhow::Result<Box<dyn CausalLm>> {
    let WeightSource::Safetensors { config, weights } = source else {
        bail!("nemotron_h models are read from safetensors (nvidia/NVIDIA-Nemotron-*), not GGUF");
    };
    let model = NemotronH::from_weights(config, weights, options)?;
    Ok(Box::new(model))
}

/// Where the table finds tensor names (documentation for readers of the registry).
pub const TENSOR_NAMES_DOC: &str = "NVIDIA names: backbone.embeddings, backbone.layers.N.norm, backbone.layers.N.mixer.\
{in_proj,conv1d,dt_bias,A_log,D,norm,out_proj | q,k,v,o_proj | gate.weight,gate.e_score_correction_bias,\
experts.E.{up,down}_proj,shared_experts.{up,down}_proj | up_proj,down_proj}, backbone.norm_f, lm_head";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The shape-giving fields of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16's config.json.
    pub(crate) fn nano_30b() -> Value {
        serde_json::json!({
            "model_type": "nemotron_h", "vocab_size": 131072, "hidden_size": 2688,
            "num_hidden_layers": 52, "tie_word_embeddings": false,
            "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
            "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128,
            "conv_kernel": 4, "chunk_size": 128, "num_attention_heads": 32, "num_key_value_heads": 2,
            "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 6,
            "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
            "intermediate_size": 1856, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
            "n_group": 1, "topk_group": 1, "layer_norm_epsilon": 1e-5, "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu", "use_conv_bias": true, "use_bias": false,
            "max_position_embeddings": 262144, "eos_token_id": 2, "bos_token_id": 1
        })
    }

    #[test]
    fn nano_30b_pattern_params_and_state() {
        let c = NemotronHConfig::from_value(&nano_30b()).unwrap();
        assert_eq!(
            (
                c.count(LayerKind::Mamba),
                c.count(LayerKind::Moe),
                c.count(LayerKind::Attention)
            ),
            (23, 23, 6)
        );
        assert_eq!(
            (c.d_inner(), c.conv_dim(), c.in_proj_dim()),
            (4096, 6144, 10304)
        );
        let (total, active) = c.parameter_counts();
        // NVIDIA's model card: 31.6B total, 3.2B active (3.6B with the embeddings).
        assert!((31.5e9..31.7e9).contains(&(total as f64)), "{total}");
        assert!((3.1e9..3.3e9).contains(&(active as f64)), "{active}");
        // Per Mamba layer: conv 3×6144 + SSM 64×64×128 f32 = 2.07 MiB; 23 layers ≈ 47.6 MiB.
        assert_eq!(c.mamba_state_values(), 3 * 6144 + 4096 * 128);
        assert_eq!(
            c.state_bytes_per_sequence(),
            23 * (3 * 6144 + 4096 * 128) * 4
        );
    }

    #[test]
    fn layer_lists_in_either_spelling() {
        let mut v = nano_30b();
        v.as_object_mut().unwrap().remove("hybrid_override_pattern");
        v["layers_block_type"] =
            serde_json::json!(["mamba", "moe", "full_attention", "mlp", "linear_attention"]);
        let c = NemotronHConfig::from_value(&v).unwrap();
        assert_eq!(c.pattern(), "ME*-M");
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut v = nano_30b();
        v["hybrid_override_pattern"] = "MEX".into();
        let err = NemotronHConfig::from_value(&v).unwrap_err().to_string();
        assert!(
            err.contains("hybrid_override_pattern") && err.contains("'X'"),
            "{err}"
        );
        let mut v = nano_30b();
        v["n_groups"] = 7.into();
        let err = NemotronHConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("n_groups"), "{err}");
        let mut v = nano_30b();
        v["mlp_hidden_act"] = "gelu".into();
        let err = NemotronHConfig::from_value(&v).unwrap_err().to_string();
        assert!(err.contains("relu2"), "{err}");
        let mut v = nano_30b();
        v["num_experts_per_tok"] = 200.into();
        assert!(NemotronHConfig::from_value(&v).is_err());
    }
}
