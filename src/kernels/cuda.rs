//! Launchers for our CUDA kernels (`src/kernels/cuda/*.cu`, compiled to PTX by build.rs and
//! embedded in the binary). Each function takes candle tensors on a CUDA device, checks shapes
//! and dtypes, and returns new tensors; the CPU versions of the same operations are the reference
//! the GPU results are checked against (see `scripts/gpu_check.sh`).
//!
//! Kernels get raw device pointers (start offsets applied) rather than typed slices, so one
//! launcher serves every dtype and the quantized KV planes can be written in place. That is sound
//! here because candle runs all work of a device on one stream: reads, writes and frees of a
//! buffer are ordered on that stream.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

/// The PTX of each kernel module (`MXFP4`, `MOE`, `KV_QUANT`, `ATTENTION`, `SSM`).
pub mod ptx {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

/// gpt-oss clamped SwiGLU constants (config `swiglu_limit`, and the fixed alpha).
pub const SWIGLU_LIMIT: f32 = 7.0;
pub const SWIGLU_ALPHA: f32 = 1.702;

/// Rows at or below which the MXFP4 product takes the decode (matrix-vector) kernel.
pub const GEMV_MAX_ROWS: usize = 8;

fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        Device::Cuda(dev) => Ok(dev),
        other => bail!("expected a tensor on a CUDA device, got one on {other:?}"),
    }
}

/// Device address of a contiguous tensor's first element.
fn ptr(t: &Tensor, what: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("{what} must be on a CUDA device");
    };
    if !layout.is_contiguous() {
        bail!(
            "{what} must be contiguous (shape {:?}, strides {:?})",
            layout.dims(),
            layout.stride()
        );
    }
    let stream = cuda_device(t)?.cuda_stream();
    // Dropping the SyncOnDrop right away is fine: one stream orders everything (module doc).
    let base = match &cs.slice {
        CudaStorageSlice::U8(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::I32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F8E4M3(s) => s.device_ptr(&stream).0,
        _ => bail!("{what}: dtype {:?} is not used by our kernels", t.dtype()),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// Kernel name suffix of a compute dtype.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("our CUDA kernels compute in f32, bf16 or f16, not {other:?}"),
    })
}

fn expect_dtype(t: &Tensor, dtypes: &[DType], what: &str) -> Result<()> {
    if !dtypes.contains(&t.dtype()) {
        bail!("{what} must be one of {dtypes:?}, got {:?}", t.dtype());
    }
    Ok(())
}

fn grid(x: usize, y: usize, z: usize, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Where the rows of an MXFP4 product come from and go to (see `Segments` in mxfp4.cu).
struct Rows {
    /// Per-expert offsets into the sorted rows (`[experts + 1]`, i32), or `None` for one segment.
    offsets: u64,
    x_rows: u64,
    y_rows: u64,
    /// Segments in the grid: experts, or 1.
    segments: usize,
    /// Rows of the single segment, or the most rows one expert can get.
    max_rows: usize,
}

/// An MXFP4 weight: `blocks [experts?, out, in/32, 16]` u8, `scales [experts?, out, in/32]` u8,
/// optional bias `[experts?, out]`.
pub struct DeviceMxfp4<'a> {
    pub blocks: &'a Tensor,
    pub scales: &'a Tensor,
    pub bias: Option<&'a Tensor>,
}

impl DeviceMxfp4<'_> {
    /// `(out_features, in_features)` after checking the two tensors agree.
    fn dims(&self) -> Result<(usize, usize)> {
        let b = self.blocks.dims();
        let s = self.scales.dims();
        if b.len() < 3 || b[b.len() - 1] != 16 || s != &b[..b.len() - 1] {
            bail!("MXFP4 weight: blocks {b:?} and scales {s:?} do not match [.., out, in/32, 16] / [.., out, in/32]");
        }
        expect_dtype(self.blocks, &[DType::U8], "MXFP4 blocks")?;
        expect_dtype(self.scales, &[DType::U8], "MXFP4 scales")?;
        Ok((b[b.len() - 3], b[b.len() - 2] * 32))
    }
}

fn launch_mxfp4(x: &Tensor, w: &DeviceMxfp4, y: &Tensor, rows: &Rows, gemv: bool) -> Result<()> {
    let dev = cuda_device(x)?;
    let (out_features, in_features) = w.dims()?;
    let name = format!(
        "mxfp4_{}_{}",
        if gemv { "gemv" } else { "gemm" },
        suffix(x.dtype())?
    );
    let func = dev.get_or_load_custom_func(&name, "xllm_mxfp4", ptx::MXFP4)?;
    let blocks = ptr(w.blocks, "MXFP4 blocks")?;
    if blocks % 16 != 0 {
        bail!(
            "MXFP4 blocks must start on a 16-byte boundary (the decode kernel reads 16-byte words)"
        );
    }
    // Kept alive until the launch is queued: a freed buffer could be reused before the kernel runs.
    let bias_tensor = w
        .bias
        .map(|b| b.to_dtype(x.dtype())?.contiguous())
        .transpose()?;
    let bias = match &bias_tensor {
        Some(b) => ptr(b, "MXFP4 bias")?,
        None => 0,
    };
    let (x_ptr, scales, y_ptr) = (
        ptr(x, "MXFP4 input")?,
        ptr(w.scales, "MXFP4 scales")?,
        ptr(y, "MXFP4 output")?,
    );
    let (seg_expert, rows_i32, in_i32, out_i32) = (
        0u64,
        rows.max_rows as i32,
        in_features as i32,
        out_features as i32,
    );
    let cfg = if gemv {
        grid(out_features.div_ceil(8), rows.segments, 1, 256, 0)
    } else {
        grid(
            out_features.div_ceil(64),
            rows.max_rows.div_ceil(64),
            rows.segments,
            256,
            0,
        )
    };
    let mut b = func.builder();
    b.arg(&x_ptr)
        .arg(&blocks)
        .arg(&scales)
        .arg(&bias)
        .arg(&y_ptr);
    b.arg(&seg_expert)
        .arg(&rows.offsets)
        .arg(&rows.x_rows)
        .arg(&rows.y_rows);
    b.arg(&rows_i32).arg(&in_i32).arg(&out_i32);
    // SAFETY: argument list and types match mxfp4_{gemv,gemm}_* in mxfp4.cu; every pointer was
    // checked to be a contiguous CUDA buffer of the size the shapes imply.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `y [tokens, out] = x [tokens, in] · Wᵀ (+ bias)` with W in MXFP4, in x's dtype (f32, bf16, f16).
/// Up to [`GEMV_MAX_ROWS`] tokens take the decode kernel (each weight byte read once), more the
/// tiled prefill kernel.
pub fn mxfp4_matmul(x: &Tensor, w: &DeviceMxfp4) -> Result<Tensor> {
    let (out_features, in_features) = w.dims()?;
    if w.blocks.rank() != 3 {
        bail!(
            "mxfp4_matmul takes one expert's weight [out, in/32, 16], got {:?}",
            w.blocks.dims()
        );
    }
    let (tokens, x_in) = x.dims2()?;
    if x_in != in_features {
        bail!("mxfp4_matmul: input has {x_in} features, the weight expects {in_features}");
    }
    let x = x.contiguous()?;
    let y = Tensor::zeros((tokens, out_features), x.dtype(), x.device())?;
    if tokens == 0 {
        return Ok(y);
    }
    let rows = Rows {
        offsets: 0,
        x_rows: 0,
        y_rows: 0,
        segments: 1,
        max_rows: tokens,
    };
    launch_mxfp4(&x, w, &y, &rows, tokens <= GEMV_MAX_ROWS)?;
    Ok(y)
}

/// One gpt-oss MoE block's experts: router top-k + softmax, tokens grouped by expert on the
/// device, MXFP4 gate_up (interleaved gate/up columns) + bias, clamped SwiGLU, MXFP4 down + bias,
/// weighted sum of each token's k outputs. Only experts that received tokens do any work.
pub struct DeviceMoe<'a> {
    /// `[experts, 2 * inter, hidden/32, 16]` etc.
    pub gate_up: DeviceMxfp4<'a>,
    /// `[experts, hidden, inter/32, 16]` etc.
    pub down: DeviceMxfp4<'a>,
    pub top_k: usize,
    pub swiglu_limit: f32,
}

/// `x [tokens, hidden]`, `router_logits [tokens, experts]` → `[tokens, hidden]` in x's dtype.
pub fn moe_forward(x: &Tensor, router_logits: &Tensor, experts: &DeviceMoe) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (tokens, hidden) = x.dims2()?;
    let (_, n_experts) = router_logits.dims2()?;
    let k = experts.top_k;
    let (gu_out, gu_in) = experts.gate_up.dims()?;
    let (down_out, down_in) = experts.down.dims()?;
    if gu_in != hidden || down_out != hidden || gu_out != 2 * down_in {
        bail!("MoE shapes disagree: hidden {hidden}, gate_up {gu_out}×{gu_in}, down {down_out}×{down_in}");
    }
    if experts.gate_up.blocks.dim(0)? != n_experts || experts.down.blocks.dim(0)? != n_experts {
        bail!(
            "router has {n_experts} experts but the weights hold {}",
            experts.gate_up.blocks.dim(0)?
        );
    }
    if k == 0 || k > n_experts || k > 32 || n_experts > 256 {
        bail!("MoE routing supports 1..=32 of at most 256 experts, got top-{k} of {n_experts}");
    }
    let device = x.device();
    let x = x.contiguous()?;
    let dtype = x.dtype();
    let pairs = tokens * k;
    if tokens == 0 {
        return Tensor::zeros((0, hidden), dtype, device);
    }

    // 1. Routing.
    let logits = router_logits.to_dtype(DType::F32)?.contiguous()?;
    let topk_ids = Tensor::zeros(pairs, DType::I32, device)?;
    let topk_weights = Tensor::zeros(pairs, DType::F32, device)?;
    {
        let func = dev.get_or_load_custom_func("moe_topk_softmax", "xllm_moe", ptx::MOE)?;
        let (l, ids, w) = (
            ptr(&logits, "router logits")?,
            ptr(&topk_ids, "top-k ids")?,
            ptr(&topk_weights, "top-k weights")?,
        );
        let (t, e, kk) = (tokens as i32, n_experts as i32, k as i32);
        let mut b = func.builder();
        b.arg(&l).arg(&ids).arg(&w).arg(&t).arg(&e).arg(&kk);
        // SAFETY: matches moe_topk_softmax(const float*, int*, float*, int, int, int).
        unsafe { b.launch(grid((tokens * 32).div_ceil(256), 1, 1, 256, 0)) }.w()?;
    }
    // 2. Grouping by expert.
    let offsets = Tensor::zeros(n_experts + 1, DType::I32, device)?;
    let sorted_pairs = Tensor::zeros(pairs, DType::I32, device)?;
    let sorted_tokens = Tensor::zeros(pairs, DType::I32, device)?;
    {
        let func = dev.get_or_load_custom_func("moe_group", "xllm_moe", ptx::MOE)?;
        let (ids, off) = (
            ptr(&topk_ids, "top-k ids")?,
            ptr(&offsets, "expert offsets")?,
        );
        let (sp, st) = (
            ptr(&sorted_pairs, "sorted pairs")?,
            ptr(&sorted_tokens, "sorted tokens")?,
        );
        let (p, kk, e) = (pairs as i32, k as i32, n_experts as i32);
        let mut b = func.builder();
        b.arg(&ids)
            .arg(&p)
            .arg(&kk)
            .arg(&e)
            .arg(&off)
            .arg(&sp)
            .arg(&st);
        // SAFETY: matches moe_group; shared memory holds 2 × experts ints.
        unsafe { b.launch(grid(1, 1, 1, 1024, (2 * n_experts * 4) as u32)) }.w()?;
    }
    let gemv = tokens <= GEMV_MAX_ROWS;
    let off = ptr(&offsets, "expert offsets")?;
    let (sp, st) = (
        ptr(&sorted_pairs, "sorted pairs")?,
        ptr(&sorted_tokens, "sorted tokens")?,
    );
    // 3. gate_up for the pairs, grouped by expert: x row = token, output row = pair.
    let gate_up = Tensor::zeros((pairs, gu_out), dtype, device)?;
    let rows = Rows {
        offsets: off,
        x_rows: st,
        y_rows: sp,
        segments: n_experts,
        max_rows: tokens,
    };
    launch_mxfp4(&x, &experts.gate_up, &gate_up, &rows, gemv)?;
    // 4. Clamped SwiGLU.
    let act = Tensor::zeros((pairs, down_in), dtype, device)?;
    {
        let name = format!("moe_swiglu_{}", suffix(dtype)?);
        let func = dev.get_or_load_custom_func(&name, "xllm_moe", ptx::MOE)?;
        let (gu, a) = (ptr(&gate_up, "gate_up")?, ptr(&act, "activation")?);
        let (total, inter, limit, alpha) = (
            (pairs * down_in) as u64,
            down_in as i32,
            experts.swiglu_limit,
            SWIGLU_ALPHA,
        );
        let mut b = func.builder();
        b.arg(&gu)
            .arg(&a)
            .arg(&total)
            .arg(&inter)
            .arg(&limit)
            .arg(&alpha);
        // SAFETY: matches moe_swiglu_*(const T*, T*, size_t, int, float, float).
        unsafe {
            b.launch(grid(
                (pairs * down_in).div_ceil(256).min(65535),
                1,
                1,
                256,
                0,
            ))
        }
        .w()?;
    }
    // 5. down: row = pair in and out.
    let expert_out = Tensor::zeros((pairs, hidden), dtype, device)?;
    let rows = Rows {
        offsets: off,
        x_rows: sp,
        y_rows: sp,
        segments: n_experts,
        max_rows: tokens,
    };
    launch_mxfp4(&act, &experts.down, &expert_out, &rows, gemv)?;
    // 6. Weighted sum per token.
    let out = Tensor::zeros((tokens, hidden), dtype, device)?;
    {
        let name = format!("moe_combine_{}", suffix(dtype)?);
        let func = dev.get_or_load_custom_func(&name, "xllm_moe", ptx::MOE)?;
        let (eo, w, o) = (
            ptr(&expert_out, "expert outputs")?,
            ptr(&topk_weights, "top-k weights")?,
            ptr(&out, "MoE output")?,
        );
        let (t, kk, h) = (tokens as i32, k as i32, hidden as i32);
        let mut b = func.builder();
        b.arg(&eo).arg(&w).arg(&o).arg(&t).arg(&kk).arg(&h);
        // SAFETY: matches moe_combine_*(const T*, const float*, T*, int, int, int).
        unsafe {
            b.launch(grid(
                (tokens * hidden).div_ceil(256).min(65535),
                1,
                1,
                256,
                0,
            ))
        }
        .w()?;
    }
    Ok(out)
}

/// Byte code of a quantized KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCode {
    Int8,
    Fp8,
}

impl KvCode {
    fn name(self) -> &'static str {
        match self {
            KvCode::Int8 => "int8",
            KvCode::Fp8 => "fp8",
        }
    }
}

/// One of K or V of a quantized cache: `codes [1, kv_heads, capacity, head_dim]` (u8 or
/// F8E4M3), `scales [1, kv_heads, capacity, 1]` f16 — the planes of `state::kv_quant`.
pub struct QuantPlane<'a> {
    pub codes: &'a Tensor,
    pub scales: &'a Tensor,
}

impl QuantPlane<'_> {
    /// `(kv_heads, capacity, head_dim)` after checking codes and scales agree.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        let (one, heads, cap, dim) = self.codes.dims4()?;
        if one != 1 || self.scales.dims() != [1, heads, cap, 1] {
            bail!(
                "quantized KV plane: codes {:?} and scales {:?} do not match",
                self.codes.dims(),
                self.scales.dims()
            );
        }
        expect_dtype(self.codes, &[DType::U8, DType::F8E4M3], "KV codes")?;
        expect_dtype(self.scales, &[DType::F16], "KV scales")?;
        Ok((heads, cap, dim))
    }
}

/// Quantizes `src [1, kv_heads, tokens, head_dim]` into `plane` at token positions `pos..`,
/// in place (quantize-on-write; same bytes as the CPU store writes).
pub fn kv_quantize_into(src: &Tensor, plane: &QuantPlane, pos: usize, code: KvCode) -> Result<()> {
    let dev = cuda_device(src)?;
    let (heads, cap, dim) = plane.dims()?;
    let (one, src_heads, tokens, src_dim) = src.dims4()?;
    if one != 1 || src_heads != heads || src_dim != dim {
        bail!(
            "KV quantize: source {:?} does not fit a cache of {heads} heads × {dim}",
            src.dims()
        );
    }
    if pos + tokens > cap {
        bail!(
            "KV quantize: tokens {pos}..{} exceed the capacity {cap}",
            pos + tokens
        );
    }
    let src = src.contiguous()?;
    let name = format!("kv_quantize_{}_{}", code.name(), suffix(src.dtype())?);
    let func = dev.get_or_load_custom_func(&name, "xllm_kv_quant", ptx::KV_QUANT)?;
    let (s, c, sc) = (
        ptr(&src, "KV source")?,
        ptr(plane.codes, "KV codes")?,
        ptr(plane.scales, "KV scales")?,
    );
    let (h, t, d, capacity, p) = (
        heads as i32,
        tokens as i32,
        dim as i32,
        cap as i32,
        pos as i32,
    );
    let mut b = func.builder();
    b.arg(&s)
        .arg(&c)
        .arg(&sc)
        .arg(&h)
        .arg(&t)
        .arg(&d)
        .arg(&capacity)
        .arg(&p);
    // SAFETY: matches kv_quantize_*; rows pos..pos+tokens lie inside the planes (checked above).
    unsafe { b.launch(grid((heads * tokens * 32).div_ceil(256), 1, 1, 256, 0)) }.w()?;
    Ok(())
}

/// Quantizes `x [1, kv_heads, tokens, head_dim]` into fresh `(codes, scales)` tensors
/// (`[1, kv_heads, tokens, head_dim]` u8 / F8E4M3, `[1, kv_heads, tokens, 1]` f16) for a
/// `kv_int8` / `kv_fp8` store: the fused kernel of [`kv_quantize_into`] in place of tensor ops.
pub fn kv_quantize(x: &Tensor, profile: crate::quant::KvProfile) -> Result<(Tensor, Tensor)> {
    use crate::quant::KvProfile;
    let (code, code_dtype) = match profile {
        KvProfile::KvInt8 => (KvCode::Int8, DType::U8),
        KvProfile::KvFp8 => (KvCode::Fp8, DType::F8E4M3),
        other => bail!("{other} is not a quantized KV profile"),
    };
    let (one, heads, tokens, dim) = x.dims4()?;
    let codes = Tensor::zeros((one, heads, tokens, dim), code_dtype, x.device())?;
    let scales = Tensor::zeros((one, heads, tokens, 1), DType::F16, x.device())?;
    kv_quantize_into(
        x,
        &QuantPlane {
            codes: &codes,
            scales: &scales,
        },
        0,
        code,
    )?;
    Ok((codes, scales))
}

/// The cache attention reads, at full capacity; only the first `len` tokens count.
pub enum KvView<'a> {
    /// `k`, `v`: `[1, kv_heads, capacity, head_dim]` in the compute dtype.
    Dense { k: &'a Tensor, v: &'a Tensor },
    Quantized {
        code: KvCode,
        k: QuantPlane<'a>,
        v: QuantPlane<'a>,
    },
}

/// Options of [`attention`].
pub struct AttentionParams<'a> {
    /// Per-head sink logits `[heads]` (gpt-oss), or `None`.
    pub sinks: Option<&'a Tensor>,
    /// Sliding window in tokens (a query sees the last `window` positions, itself included), 0 = full.
    pub window: usize,
    pub softmax_scale: f32,
    /// Tokens of the cache to read (the queries are its last `q_len` positions).
    pub kv_len: usize,
}

/// Causal attention of `q [1, heads, q_len, head_dim]` over the cache → `[1, heads, q_len, head_dim]`.
pub fn attention(q: &Tensor, kv: &KvView, params: &AttentionParams) -> Result<Tensor> {
    let dev = cuda_device(q)?;
    let (one, heads, q_len, dim) = q.dims4()?;
    let (kv_heads, cap, kv_dim) = match kv {
        KvView::Dense { k, v } => {
            if k.dims() != v.dims() {
                bail!("attention: K {:?} and V {:?} differ", k.dims(), v.dims());
            }
            let (_, h, c, d) = k.dims4()?;
            if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
                bail!(
                    "attention: dense K/V must be {:?} like the queries",
                    q.dtype()
                );
            }
            (h, c, d)
        }
        KvView::Quantized { k, v, .. } => {
            let dims = k.dims()?;
            if v.dims()? != dims {
                bail!("attention: K and V planes differ");
            }
            dims
        }
    };
    if one != 1
        || kv_dim != dim
        || dim % 32 != 0
        || dim > 256
        || kv_heads == 0
        || heads % kv_heads != 0
    {
        bail!("attention: queries {:?} do not fit a cache of {kv_heads} heads × {kv_dim} (head_dim must be a multiple of 32, at most 256)", q.dims());
    }
    if params.kv_len > cap || q_len > params.kv_len {
        bail!(
            "attention: {q_len} queries over {} cached tokens (capacity {cap})",
            params.kv_len
        );
    }
    let q = q.contiguous()?;
    let out = Tensor::zeros((1, heads, q_len, dim), q.dtype(), q.device())?;
    let sinks = match params.sinks {
        Some(s) => {
            if s.dims1()? != heads {
                bail!("attention: {} sinks for {heads} heads", s.dims1()?);
            }
            Some(s.to_dtype(DType::F32)?.contiguous()?)
        }
        None => None,
    };
    let sinks_ptr = match &sinks {
        Some(s) => ptr(s, "attention sinks")?,
        None => 0,
    };
    let (q_ptr, o_ptr) = (ptr(&q, "queries")?, ptr(&out, "attention output")?);
    let ints = [
        heads,
        kv_heads,
        q_len,
        dim,
        cap,
        params.kv_len,
        params.kv_len - q_len,
        params.window,
    ]
    .map(|v| v as i32);
    let dt = suffix(q.dtype())?;
    let (name, inputs) = match kv {
        KvView::Dense { k, v } => (
            format!("attention_dense_{dt}"),
            vec![ptr(k, "keys")?, ptr(v, "values")?],
        ),
        KvView::Quantized { code, k, v } => (
            format!("attention_{}_{dt}", code.name()),
            vec![
                ptr(k.codes, "key codes")?,
                ptr(k.scales, "key scales")?,
                ptr(v.codes, "value codes")?,
                ptr(v.scales, "value scales")?,
            ],
        ),
    };
    let func = dev.get_or_load_custom_func(&name, "xllm_attention", ptx::ATTENTION)?;
    let mut b = func.builder();
    b.arg(&q_ptr);
    for p in &inputs {
        b.arg(p);
    }
    b.arg(&sinks_ptr).arg(&o_ptr);
    for v in &ints {
        b.arg(v);
    }
    b.arg(&params.softmax_scale);
    // SAFETY: matches attention_{dense,int8,fp8}_* in attention.cu; shapes checked above.
    unsafe { b.launch(grid(q_len, heads, 1, 128, 0)) }.w()?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Mamba2 (Nemotron-H): twins of `kernels::ssm` (ssm.cu), f32 throughout, one sequence per call.

fn expect_f32(t: &Tensor, what: &str) -> Result<()> {
    expect_dtype(t, &[DType::F32], what)
}

/// Causal depthwise conv1d + SiLU of `x [tokens, stride]` (the first `taps.dim(1)` features of
/// each row) with `taps [kernel, channels]` (tap-major, as [`crate::kernels::ssm::CausalConv1d`]
/// keeps them) and `bias [channels]`, continuing from `state [kernel − 1, channels]`, which is
/// updated in place. Returns `[tokens, channels]`.
pub fn ssm_conv1d(
    x: &Tensor,
    taps: &Tensor,
    bias: Option<&Tensor>,
    state: &Tensor,
) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (kernel, channels) = taps.dims2()?;
    let (tokens, stride) = x.dims2()?;
    if kernel == 0 || kernel > 8 || stride < channels || state.dims2()? != (kernel - 1, channels) {
        bail!(
            "ssm_conv1d: input {:?}, taps {:?} and state {:?} do not fit (kernel at most 8)",
            x.dims(),
            taps.dims(),
            state.dims()
        );
    }
    for (t, what) in [
        (x, "conv input"),
        (taps, "conv taps"),
        (state, "conv state"),
    ] {
        expect_f32(t, what)?;
    }
    if let Some(b) = bias {
        expect_f32(b, "conv bias")?;
        if b.dims1()? != channels {
            bail!("ssm_conv1d: bias of {} for {channels} channels", b.dims1()?);
        }
    }
    let x = x.contiguous()?;
    let out = Tensor::zeros((tokens, channels), DType::F32, x.device())?;
    let bias_ptr = match bias {
        Some(b) => ptr(b, "conv bias")?,
        None => 0,
    };
    let (x_ptr, taps_ptr, state_ptr, out_ptr) = (
        ptr(&x, "conv input")?,
        ptr(taps, "conv taps")?,
        ptr(state, "conv state")?,
        ptr(&out, "conv output")?,
    );
    let ints = [stride, tokens, channels, kernel].map(|v| v as i32);
    let func = dev.get_or_load_custom_func("ssm_conv1d_f32", "xllm_ssm", ptx::SSM)?;
    let mut b = func.builder();
    b.arg(&x_ptr)
        .arg(&ints[0])
        .arg(&ints[1])
        .arg(&ints[2])
        .arg(&ints[3]);
    b.arg(&taps_ptr)
        .arg(&bias_ptr)
        .arg(&state_ptr)
        .arg(&out_ptr);
    // SAFETY: matches ssm_conv1d_f32 in ssm.cu; every buffer is contiguous f32 of the checked shape.
    unsafe { b.launch(grid(channels.div_ceil(256), 1, 1, 256, 0)) }.w()?;
    Ok(out)
}

/// Per-head constants of [`ssm_scan`] (`[heads]` f32 tensors on the device) and its shapes.
pub struct DeviceScan<'a> {
    /// `A = −exp(A_log)`.
    pub a: &'a Tensor,
    pub d: &'a Tensor,
    pub dt_bias: &'a Tensor,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub dt_min: f32,
}

/// The selective-scan recurrence over `xbc [tokens, stride]` (`x [H·P] | B [G·N] | C [G·N]` at
/// the start of each row) and raw `dt [tokens, H]`, continuing from `state [H, P, N]` (updated in
/// place). Returns `y [tokens, H·P]` (the D skip included), as [`crate::kernels::ssm::SsmScan`].
pub fn ssm_scan(xbc: &Tensor, dt: &Tensor, scan: &DeviceScan, state: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(xbc)?;
    let (tokens, heads) = dt.dims2()?;
    let (p, g, n) = (scan.head_dim, scan.groups, scan.state);
    let inner = heads * p;
    let (x_tokens, stride) = xbc.dims2()?;
    if g == 0
        || heads % g != 0
        || n > 256
        || x_tokens != tokens
        || stride < inner + 2 * g * n
        || state.dims3()? != (heads, p, n)
    {
        bail!(
            "ssm_scan: xbc {:?}, dt {:?} and state {:?} do not fit {heads} heads × {p}, {g} groups × {n} (state at most 256)",
            xbc.dims(),
            dt.dims(),
            state.dims()
        );
    }
    for (t, what) in [
        (xbc, "scan input"),
        (dt, "scan dt"),
        (state, "scan state"),
        (scan.a, "A"),
        (scan.d, "D"),
        (scan.dt_bias, "dt_bias"),
    ] {
        expect_f32(t, what)?;
    }
    for (t, what) in [(scan.a, "A"), (scan.d, "D"), (scan.dt_bias, "dt_bias")] {
        if t.dims1()? != heads {
            bail!(
                "ssm_scan: {what} holds {} values for {heads} heads",
                t.dims1()?
            );
        }
    }
    let (xbc, dt) = (xbc.contiguous()?, dt.contiguous()?);
    let y = Tensor::zeros((tokens, inner), DType::F32, xbc.device())?;
    let ptrs = [
        ptr(&xbc, "scan input")?,
        ptr(&dt, "scan dt")?,
        ptr(scan.a, "A")?,
        ptr(scan.d, "D")?,
        ptr(scan.dt_bias, "dt_bias")?,
        ptr(state, "scan state")?,
        ptr(&y, "scan output")?,
    ];
    let ints = [stride, tokens, heads, p, g, n].map(|v| v as i32);
    let func = dev.get_or_load_custom_func("ssm_scan_f32", "xllm_ssm", ptx::SSM)?;
    let mut b = func.builder();
    b.arg(&ptrs[0]).arg(&ints[0]).arg(&ptrs[1]);
    b.arg(&ints[1])
        .arg(&ints[2])
        .arg(&ints[3])
        .arg(&ints[4])
        .arg(&ints[5]);
    b.arg(&ptrs[2])
        .arg(&ptrs[3])
        .arg(&ptrs[4])
        .arg(&scan.dt_min);
    b.arg(&ptrs[5]).arg(&ptrs[6]);
    // SAFETY: matches ssm_scan_f32 in ssm.cu; shapes checked above, buffers contiguous f32.
    unsafe { b.launch(grid((inner * 32).div_ceil(256), 1, 1, 256, 0)) }.w()?;
    Ok(y)
}

/// The grouped gated RMSNorm: `y [tokens, width] · silu(z)` (gate rows `z [tokens, ≥ width]`,
/// the first `width` features used), RMS-normalised per group of `group` features, `· weight`.
pub fn ssm_gated_norm(
    y: &Tensor,
    z: &Tensor,
    weight: &Tensor,
    group: usize,
    eps: f32,
) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let (tokens, width) = y.dims2()?;
    let (z_tokens, z_stride) = z.dims2()?;
    if group == 0
        || width % group != 0
        || z_tokens != tokens
        || z_stride < width
        || weight.dims1()? != width
    {
        bail!(
            "ssm_gated_norm: y {:?}, gate {:?} and weight {:?} do not fit groups of {group}",
            y.dims(),
            z.dims(),
            weight.dims()
        );
    }
    for (t, what) in [(y, "norm input"), (z, "norm gate"), (weight, "norm weight")] {
        expect_f32(t, what)?;
    }
    let (y, z) = (y.contiguous()?, z.contiguous()?);
    let out = Tensor::zeros((tokens, width), DType::F32, y.device())?;
    let ptrs = [
        ptr(&y, "norm input")?,
        ptr(&z, "norm gate")?,
        ptr(weight, "norm weight")?,
        ptr(&out, "norm output")?,
    ];
    let ints = [z_stride, width, group].map(|v| v as i32);
    let func = dev.get_or_load_custom_func("ssm_gated_norm_f32", "xllm_ssm", ptx::SSM)?;
    let mut b = func.builder();
    b.arg(&ptrs[0])
        .arg(&ptrs[1])
        .arg(&ints[0])
        .arg(&ptrs[2])
        .arg(&ints[1])
        .arg(&ints[2]);
    b.arg(&eps).arg(&ptrs[3]);
    // SAFETY: matches ssm_gated_norm_f32 in ssm.cu; shapes checked above, buffers contiguous f32.
    unsafe { b.launch(grid(tokens * (width / group), 1, 1, 256, 0)) }.w()?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// `cuda_fwd` of the CPU ops in `kernels::mxfp4` / `kernels::moe`: their weights are host bytes
// (usually the mmapped checkpoint), uploaded to the device once and reused.

/// Device copies of host buffers, keyed by (host address, byte length, device). Weights live as
/// long as the model, so entries are never evicted; a process loads one model.
type UploadKey = (usize, usize, candle_core::cuda_backend::DeviceId);
static UPLOADS: std::sync::Mutex<Option<std::collections::HashMap<UploadKey, Tensor>>> =
    std::sync::Mutex::new(None);

/// The device copy of `bytes` shaped `shape` (u8), uploading it the first time.
fn uploaded_bytes(bytes: &[u8], shape: &[usize], device: &Device) -> Result<Tensor> {
    uploaded(bytes.as_ptr() as usize, bytes.len(), device, || {
        Tensor::from_slice(bytes, shape, device)
    })
}

/// The device copy of `values` shaped `shape` (f32), uploading it the first time.
fn uploaded_f32(values: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
    uploaded(
        values.as_ptr() as usize,
        std::mem::size_of_val(values),
        device,
        || Tensor::from_slice(values, shape, device),
    )
}

fn uploaded(
    addr: usize,
    len: usize,
    device: &Device,
    make: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let Device::Cuda(dev) = device else {
        bail!("uploads are for CUDA devices");
    };
    let key = (addr, len, dev.id());
    let mut cache = UPLOADS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if let Some(t) = cache.get(&key) {
        return Ok(t.clone());
    }
    let t = make()?;
    cache.insert(key, t.clone());
    Ok(t)
}

/// A contiguous tensor holding what `storage`/`layout` describe (a device-to-device copy of the
/// activations; the weights, the large part, are never copied).
fn tensor_of(storage: &candle_core::CudaStorage, layout: &candle_core::Layout) -> Result<Tensor> {
    use candle_core::backend::{BackendDevice, BackendStorage};
    let shape = layout.shape().clone();
    let dev = storage.device();
    // SAFETY: every element is written by copy_strided_src right below.
    let mut dst = unsafe { dev.alloc_uninit(&shape, storage.dtype())? };
    storage.copy_strided_src(&mut dst, 0, layout)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(dst),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// The storage of a tensor this module just made (contiguous, offset 0), for returning from a
/// `cuda_fwd`.
fn storage_of(t: &Tensor) -> Result<candle_core::CudaStorage> {
    use candle_core::backend::BackendStorage;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(cs) => cs.try_clone(layout),
        _ => bail!("expected a CUDA tensor"),
    }
}

/// `cuda_fwd` of [`super::mxfp4::Mxfp4Matmul`]: `x [.., in]` → `[.., out]` in x's dtype.
pub fn mxfp4_op_cuda_fwd(
    weight: &super::mxfp4::Mxfp4Weight,
    storage: &candle_core::CudaStorage,
    layout: &candle_core::Layout,
) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
    let x = tensor_of(storage, layout)?;
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        bail!("mxfp4-matmul: activations must have at least one dimension");
    };
    let tokens: usize = lead.iter().product();
    let (out, inf) = (weight.out_features, weight.in_features);
    let device = x.device().clone();
    let blocks = uploaded_bytes(weight.blocks.as_slice(), &[out, inf / 32, 16], &device)?;
    let scales = uploaded_bytes(weight.scales.as_slice(), &[out, inf / 32], &device)?;
    let x = if matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        x
    } else {
        x.to_dtype(DType::F32)?
    };
    let y = mxfp4_matmul(
        &x.reshape((tokens, in_features))?,
        &DeviceMxfp4 {
            blocks: &blocks,
            scales: &scales,
            bias: None,
        },
    )?;
    let mut shape = lead.to_vec();
    shape.push(out);
    let y = y.to_dtype(storage_dtype(storage))?;
    Ok((storage_of(&y)?, candle_core::Shape::from(shape)))
}

fn storage_dtype(storage: &candle_core::CudaStorage) -> DType {
    use candle_core::backend::BackendStorage;
    storage.dtype()
}

/// `cuda_fwd` of [`super::moe::MoeOp`]: `x [tokens, hidden]`, `router_logits [tokens, experts]`.
pub fn moe_op_cuda_fwd(
    experts: &super::moe::MoeExperts,
    x: (&candle_core::CudaStorage, &candle_core::Layout),
    logits: (&candle_core::CudaStorage, &candle_core::Layout),
) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
    experts.validate()?;
    let x = tensor_of(x.0, x.1)?;
    let logits = tensor_of(logits.0, logits.1)?;
    let (e, h, i) = (experts.experts, experts.hidden, experts.intermediate);
    let device = x.device().clone();
    let gub = uploaded_bytes(
        experts.gate_up_blocks.as_slice(),
        &[e, 2 * i, h / 32, 16],
        &device,
    )?;
    let gus = uploaded_bytes(
        experts.gate_up_scales.as_slice(),
        &[e, 2 * i, h / 32],
        &device,
    )?;
    let gubias = uploaded_f32(&experts.gate_up_bias, &[e, 2 * i], &device)?;
    let db = uploaded_bytes(experts.down_blocks.as_slice(), &[e, h, i / 32, 16], &device)?;
    let ds = uploaded_bytes(experts.down_scales.as_slice(), &[e, h, i / 32], &device)?;
    let dbias = uploaded_f32(&experts.down_bias, &[e, h], &device)?;
    if experts.swiglu.alpha != SWIGLU_ALPHA {
        bail!(
            "moe: the CUDA kernel uses gpt-oss's alpha {SWIGLU_ALPHA}, the layer asks for {}",
            experts.swiglu.alpha
        );
    }
    let moe = DeviceMoe {
        gate_up: DeviceMxfp4 {
            blocks: &gub,
            scales: &gus,
            bias: Some(&gubias),
        },
        down: DeviceMxfp4 {
            blocks: &db,
            scales: &ds,
            bias: Some(&dbias),
        },
        top_k: experts.top_k,
        swiglu_limit: experts.swiglu.limit,
    };
    let dtype = x.dtype();
    let x = if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        x
    } else {
        x.to_dtype(DType::F32)?
    };
    let y = moe_forward(&x, &logits, &moe)?.to_dtype(dtype)?;
    let shape = y.shape().clone();
    Ok((storage_of(&y)?, shape))
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
