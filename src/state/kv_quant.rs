//! Quantized KV stores for the `kv_int8` and `kv_fp8` profiles.
//!
//! Both keep one byte per element plus one f16 scale per token per KV head (for K and for V), so
//! a layer costs `2 × tokens × kv_heads × (head_dim + 2)` bytes instead of
//! `2 × tokens × kv_heads × head_dim × 2` (f16) or `× 4` (f32).
//!
//! * Quantize on write: for each token and head, `scale = amax / MAX_CODE` is rounded to f16
//!   first and the codes are computed with that rounded scale, so decoding with the stored scale
//!   reproduces exactly what the encoder aimed for. A row of zeros gets scale 0 (and decodes to
//!   zeros): the division uses 1 in its place, never 0.
//! * Dequantize on read: `append` returns all cached keys/values in the compute dtype, decoded
//!   from the bytes every step. Keeping a dequantized copy would defeat the memory saving.
//!
//! Two implementations of each direction with identical results: on the CPU a fused loop over
//! raw slices (rayon over rows, a 256-entry decode table); on other devices a chain of candle
//! tensor ops (what CUDA and Metal run). Tests check that the two agree bit for bit.

use std::marker::PhantomData;

use candle_core::{CpuStorage, DType, Device, DeviceLocation, Result, Storage, Tensor};
use float8::F8E4M3;
use half::{bf16, f16};
use rayon::prelude::*;

use super::kv_cache::{KvContents, KvLayout, KvStore};
use crate::device::DeviceRequest;
use crate::quant::{KvProfile, QuantError, KV_SCALE_BYTES};

/// Largest finite f16, the ceiling of a stored scale.
const F16_MAX: f64 = 65504.0;

/// How one value (already divided by its row's scale) becomes one stored byte, and back.
pub trait ByteCodec: Send + Sync + 'static {
    /// Profile this codec implements (for messages).
    const PROFILE: KvProfile;
    /// Magnitude of the largest code: a row's scale is `amax / MAX_CODE`.
    const MAX_CODE: f32;
    /// Element dtype of the code tensors.
    const STORAGE_DTYPE: DType;

    /// Host path: one scaled value to its byte.
    fn encode(scaled: f32) -> u8;
    /// Host path: one byte to its (unscaled) value; inlined into the dequantization loop.
    fn decode(code: u8) -> f32;
    /// Device path: scaled f32 values to a tensor of `STORAGE_DTYPE`, same results as `encode`.
    fn encode_tensor(scaled: &Tensor) -> Result<Tensor>;
    /// Device path: codes to unscaled f32 values, same results as `decode`.
    fn decode_tensor(codes: &Tensor) -> Result<Tensor>;
    /// The bytes of a CPU code tensor.
    fn code_bytes(storage: &CpuStorage) -> Result<&[u8]>;
}

/// Symmetric int8 in `[-127, 127]`. candle has no i8 dtype, so the code is stored in a `u8` with
/// an offset of +128 (byte 128 is zero); -128 is never produced, keeping the range symmetric.
pub struct Int8Codec;

/// Offset between the signed int8 value and the stored `u8` byte.
const INT8_OFFSET: f32 = 128.0;

impl ByteCodec for Int8Codec {
    const PROFILE: KvProfile = KvProfile::KvInt8;
    const MAX_CODE: f32 = 127.0;
    const STORAGE_DTYPE: DType = DType::U8;

    fn encode(scaled: f32) -> u8 {
        (scaled.round().clamp(-127.0, 127.0) + INT8_OFFSET) as u8
    }

    #[inline(always)]
    fn decode(code: u8) -> f32 {
        code as f32 - INT8_OFFSET
    }

    fn encode_tensor(scaled: &Tensor) -> Result<Tensor> {
        (scaled.round()?.clamp(-127f32, 127f32)? + INT8_OFFSET as f64)?.to_dtype(DType::U8)
    }

    fn decode_tensor(codes: &Tensor) -> Result<Tensor> {
        codes.to_dtype(DType::F32)? - INT8_OFFSET as f64
    }

    fn code_bytes(storage: &CpuStorage) -> Result<&[u8]> {
        storage.as_slice::<u8>()
    }
}

/// FP8 E4M3 (finite range ±448, saturating). The per-row scale maps the row's largest magnitude
/// to 448, so keys and values of any size fit.
pub struct Fp8Codec;

impl ByteCodec for Fp8Codec {
    const PROFILE: KvProfile = KvProfile::KvFp8;
    const MAX_CODE: f32 = 448.0;
    const STORAGE_DTYPE: DType = DType::F8E4M3;

    fn encode(scaled: f32) -> u8 {
        F8E4M3::from_f32(scaled).to_bits()
    }

    /// Branch-free (vectorisable) E4M3 decoding, equal to `F8E4M3::to_f32` for every byte but
    /// the two NaN codes, which the saturating encoder never writes.
    #[inline(always)]
    fn decode(code: u8) -> f32 {
        let code = code as u32;
        let sign = (code & 0x80) << 24;
        let magnitude = code & 0x7F;
        // Normal numbers: move exponent and mantissa into f32 position and rebias (7 → 127).
        let normal = f32::from_bits(sign | ((magnitude << 20) + (120 << 23)));
        // Subnormals (exponent field 0): mantissa × 2^-9.
        let subnormal = f32::from_bits(sign | (magnitude as f32 * (1.0 / 512.0)).to_bits());
        if magnitude < 8 {
            subnormal
        } else {
            normal
        }
    }

    fn encode_tensor(scaled: &Tensor) -> Result<Tensor> {
        scaled.to_dtype(DType::F8E4M3)
    }

    fn decode_tensor(codes: &Tensor) -> Result<Tensor> {
        codes.to_dtype(DType::F32)
    }

    fn code_bytes(storage: &CpuStorage) -> Result<&[u8]> {
        let codes = storage.as_slice::<F8E4M3>()?;
        // SAFETY: F8E4M3 is `#[repr(transparent)]` over a `u8`, so the slice has the same size,
        // alignment and validity as a byte slice of the same length.
        Ok(unsafe { std::slice::from_raw_parts(codes.as_ptr().cast::<u8>(), codes.len()) })
    }
}

/// `kv_int8`: symmetric int8 with an f16 scale per token per KV head.
pub type Int8KvStore = ScaledKvStore<Int8Codec>;
/// `kv_fp8`: FP8 E4M3 with an f16 scale per token per KV head.
pub type Fp8KvStore = ScaledKvStore<Fp8Codec>;

/// Fails with `unsupported quantization` when `profile` cannot run on the device at `location`,
/// naming the device and what would work there. Takes a location rather than a device so it can
/// run before anything is loaded or any device is opened (`--device metal:0` can be checked on a
/// machine without Metal).
pub fn check_kv_profile_on_device(
    profile: KvProfile,
    location: DeviceLocation,
) -> std::result::Result<(), QuantError> {
    if let (KvProfile::KvFp8, DeviceLocation::Metal { gpu_id }) = (profile, location) {
        return Err(QuantError::Unsupported {
            token: profile.token().to_string(),
            subject: format!("device metal:{gpu_id}"),
            reason: "candle has no FP8 (E4M3) conversion kernels on Metal".to_string(),
            alternatives: "use kv_int8 there, or no suffix for the unquantized cache".to_string(),
        });
    }
    Ok(())
}

/// [`check_kv_profile_on_device`] for what the user asked with `--device`, before any device is
/// opened. `auto` passes here; the store checks again once the device is known.
pub fn check_kv_profile_on_request(
    profile: KvProfile,
    request: DeviceRequest,
) -> std::result::Result<(), QuantError> {
    let location = match request {
        DeviceRequest::Auto => return Ok(()),
        DeviceRequest::Cpu => DeviceLocation::Cpu,
        DeviceRequest::Cuda(gpu_id) => DeviceLocation::Cuda { gpu_id },
        DeviceRequest::Metal(gpu_id) => DeviceLocation::Metal { gpu_id },
    };
    check_kv_profile_on_device(profile, location)
}

/// Codes and scales of one of K or V.
struct Plane {
    /// `[1, kv_heads, capacity, head_dim]`, `STORAGE_DTYPE`.
    codes: Tensor,
    /// `[1, kv_heads, capacity, 1]`, f16.
    scales: Tensor,
}

/// A KV store of one byte per element and one f16 scale per token per head, generic over the
/// byte encoding. Grows by whole [`KV_CHUNK_TOKENS`](super::kv_cache::KV_CHUNK_TOKENS) chunks like the dense store.
pub struct ScaledKvStore<C: ByteCodec> {
    layout: KvLayout,
    /// Compute dtype that `append` returns.
    dtype: DType,
    device: Device,
    /// Use the fused raw-slice loops (CPU) rather than tensor ops.
    host_path: bool,
    /// `(K, V)` once the first token arrives.
    planes: Option<(Plane, Plane)>,
    capacity: usize,
    len: usize,
    codec: PhantomData<C>,
}

impl<C: ByteCodec> ScaledKvStore<C> {
    /// A store that returns keys/values in `dtype` (f32, f16 or bf16). Fails with
    /// `unsupported quantization` if the device cannot run this profile.
    pub fn new(layout: KvLayout, dtype: DType, device: &Device) -> Result<Self> {
        check_kv_profile_on_device(C::PROFILE, device.location())
            .map_err(candle_core::Error::wrap)?;
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            candle_core::bail!(
                "{} KV cache cannot return {dtype:?}: expected f32, f16 or bf16",
                C::PROFILE
            );
        }
        Ok(Self {
            layout,
            dtype,
            device: device.clone(),
            host_path: device.is_cpu(),
            planes: None,
            capacity: 0,
            len: 0,
            codec: PhantomData,
        })
    }

    /// Forces the tensor-op path (what GPUs run) even on the CPU, so tests can compare the two.
    #[cfg(test)]
    fn with_tensor_ops(mut self) -> Self {
        self.host_path = false;
        self
    }

    /// Makes room for `needed` tokens, growing by whole chunks (bounded by `max_tokens`).
    fn reserve(&mut self, needed: usize) -> Result<()> {
        let Some(new_cap) = self.layout.grown_capacity(self.capacity, needed)? else {
            return Ok(());
        };
        let (heads, dim) = (self.layout.kv_heads, self.layout.head_dim);
        let grow = |old: Option<&Plane>| -> Result<Plane> {
            let codes = Tensor::zeros((1, heads, new_cap, dim), C::STORAGE_DTYPE, &self.device)?;
            let scales = Tensor::zeros((1, heads, new_cap, 1), DType::F16, &self.device)?;
            if let Some(old) = old.filter(|_| self.len > 0) {
                codes.slice_set(&old.codes.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                scales.slice_set(&old.scales.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(Plane { codes, scales })
        };
        let k = grow(self.planes.as_ref().map(|p| &p.0))?;
        let v = grow(self.planes.as_ref().map(|p| &p.1))?;
        self.planes = Some((k, v));
        self.capacity = new_cap;
        Ok(())
    }

    /// Quantizes `x` (`[1, kv_heads, t, head_dim]`) into `(codes, scales)` tensors of shape
    /// `[1, kv_heads, t, head_dim]` and `[1, kv_heads, t, 1]`.
    fn quantize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.host_path {
            quantize_host::<C>(x)
        } else {
            // One fused kernel instead of the chain of tensor ops (src/kernels/cuda/kv_quant.cu).
            #[cfg(feature = "cuda")]
            if self.device.is_cuda() {
                return crate::kernels::cuda::kv_quantize(x, C::PROFILE);
            }
            quantize_tensor_ops::<C>(x)
        }
    }

    /// The first `len` tokens of a plane, decoded into `[1, kv_heads, len, head_dim]` in the
    /// compute dtype.
    fn dequantize(&self, plane: &Plane) -> Result<Tensor> {
        if self.host_path {
            dequantize_host::<C>(plane, self.layout, self.capacity, self.len, self.dtype)
        } else {
            let codes = plane.codes.narrow(2, 0, self.len)?;
            let scales = plane.scales.narrow(2, 0, self.len)?.to_dtype(DType::F32)?;
            C::decode_tensor(&codes)?
                .broadcast_mul(&scales)?
                .to_dtype(self.dtype)
        }
    }
}

impl<C: ByteCodec> KvStore for ScaledKvStore<C> {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.write(k, v)?;
        let (kp, vp) = self.planes.as_ref().expect("write allocated the planes");
        Ok((self.dequantize(kp)?, self.dequantize(vp)?))
    }

    fn write(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(2)?;
        let expected = (1, self.layout.kv_heads, t, self.layout.head_dim);
        if k.dims4()? != expected || v.dims4()? != expected {
            candle_core::bail!(
                "{} KV cache expects K and V of shape {expected:?}, got {:?} and {:?}",
                C::PROFILE,
                k.dims(),
                v.dims()
            );
        }
        self.reserve(self.len + t)?;
        let (kq, ks) = self.quantize(k)?;
        let (vq, vs) = self.quantize(v)?;
        let (kp, vp) = self.planes.as_ref().expect("reserve allocated the planes");
        kp.codes.slice_set(&kq, 2, self.len)?;
        kp.scales.slice_set(&ks, 2, self.len)?;
        vp.codes.slice_set(&vq, 2, self.len)?;
        vp.scales.slice_set(&vs, 2, self.len)?;
        self.len += t;
        Ok(())
    }

    fn contents(&self) -> Option<KvContents<'_>> {
        self.planes.as_ref().map(|(k, v)| KvContents::Quantized {
            profile: C::PROFILE,
            k_codes: &k.codes,
            k_scales: &k.scales,
            v_codes: &v.codes,
            v_scales: &v.scales,
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn read(&self) -> Result<(Tensor, Tensor)> {
        let Some((kp, vp)) = self.planes.as_ref() else {
            candle_core::bail!("internal error: reading an empty KV store");
        };
        Ok((self.dequantize(kp)?, self.dequantize(vp)?))
    }

    fn allocated_bytes(&self) -> usize {
        let per_token_head =
            self.layout.head_dim * C::STORAGE_DTYPE.size_in_bytes() + KV_SCALE_BYTES;
        2 * self.capacity * self.layout.kv_heads * per_token_head
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// The scale of a row whose largest magnitude is `amax`, rounded to f16 (what is stored).
fn row_scale<C: ByteCodec>(amax: f32) -> f16 {
    f16::from_f32((amax / C::MAX_CODE).min(F16_MAX as f32))
}

/// Fused CPU quantization over raw slices: one pass per row for the max, one for the codes.
fn quantize_host<C: ByteCodec>(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, heads, t, dim) = x.dims4()?;
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut codes = vec![0u8; values.len()];
    let mut scales = vec![f16::ZERO; heads * t];
    codes
        .par_chunks_mut(dim)
        .zip(values.par_chunks(dim))
        .zip(scales.par_iter_mut())
        .for_each(|((code_row, row), scale_out)| {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = row_scale::<C>(amax);
            let divisor = match scale.to_f32() {
                0.0 => 1.0,
                s => s,
            };
            for (c, v) in code_row.iter_mut().zip(row) {
                *c = C::encode(v / divisor);
            }
            *scale_out = scale;
        });
    let codes = Tensor::from_raw_buffer(&codes, C::STORAGE_DTYPE, &[1, heads, t, dim], x.device())?;
    let scales = Tensor::from_vec(scales, (1, heads, t, 1), x.device())?;
    Ok((codes, scales))
}

/// Quantization as candle tensor ops (any device); same results as [`quantize_host`].
fn quantize_tensor_ops<C: ByteCodec>(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let amax = x.abs()?.max_keepdim(3)?;
    let scales = (amax / C::MAX_CODE as f64)?
        .clamp(0f32, F16_MAX as f32)?
        .to_dtype(DType::F16)?;
    let scale = scales.to_dtype(DType::F32)?;
    // Rows of zeros (scale 0) divide by 1 instead.
    let divisor = (&scale + scale.eq(0f32)?.to_dtype(DType::F32)?)?;
    let codes = C::encode_tensor(&x.broadcast_div(&divisor)?)?;
    Ok((codes, scales))
}

/// Tokens per parallel task of the host dequantization (per head).
const DEQUANT_BLOCK_TOKENS: usize = 128;

/// Fused CPU dequantization of the first `len` tokens: rayon over blocks of tokens of each
/// head (contiguous codes in, contiguous rows out), one branch-free decode and one multiply per
/// element, written straight in the compute dtype.
fn dequantize_host<C: ByteCodec>(
    plane: &Plane,
    layout: KvLayout,
    capacity: usize,
    len: usize,
    dtype: DType,
) -> Result<Tensor> {
    let (heads, dim) = (layout.kv_heads, layout.head_dim);
    let (code_storage, code_layout) = plane.codes.storage_and_layout();
    let (scale_storage, scale_layout) = plane.scales.storage_and_layout();
    let (Storage::Cpu(code_storage), Storage::Cpu(scale_storage)) =
        (&*code_storage, &*scale_storage)
    else {
        candle_core::bail!("host KV dequantization needs CPU tensors");
    };
    // The planes are whole tensors we allocated: contiguous `[1, heads, capacity, ...]` from
    // their start offset.
    let codes = &C::code_bytes(code_storage)?[code_layout.start_offset()..];
    let scales = &scale_storage.as_slice::<f16>()?[scale_layout.start_offset()..];
    let shape = (1, heads, len, dim);
    let device = plane.codes.device();
    match dtype {
        DType::F32 => {
            let out = decode_planes::<C, f32>(codes, scales, heads, capacity, len, dim, |v| v);
            Tensor::from_vec(out, shape, device)
        }
        DType::F16 => {
            let out =
                decode_planes::<C, f16>(codes, scales, heads, capacity, len, dim, f16::from_f32);
            Tensor::from_vec(out, shape, device)
        }
        DType::BF16 => {
            let out =
                decode_planes::<C, bf16>(codes, scales, heads, capacity, len, dim, bf16::from_f32);
            Tensor::from_vec(out, shape, device)
        }
        other => candle_core::bail!("KV cache cannot return {other:?}"),
    }
}

/// Decodes `len` tokens of every head from `[heads, capacity, dim]` codes and
/// `[heads, capacity]` scales into a `[heads, len, dim]` buffer.
fn decode_planes<C: ByteCodec, T: Copy + Default + Send>(
    codes: &[u8],
    scales: &[f16],
    heads: usize,
    capacity: usize,
    len: usize,
    dim: usize,
    convert: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); heads * len * dim];
    if len == 0 {
        return out;
    }
    // One task per block of tokens of one head: blocks never straddle heads, so each reads
    // contiguous codes and writes contiguous rows.
    out.par_chunks_mut(len * dim)
        .enumerate()
        .for_each(|(h, out_head)| {
            let head_codes = &codes[h * capacity * dim..][..len * dim];
            let head_scales = &scales[h * capacity..][..len];
            out_head
                .par_chunks_mut(DEQUANT_BLOCK_TOKENS * dim)
                .zip(head_codes.par_chunks(DEQUANT_BLOCK_TOKENS * dim))
                .zip(head_scales.par_chunks(DEQUANT_BLOCK_TOKENS))
                .for_each(|((out_rows, code_rows), row_scales)| {
                    for ((out_row, code_row), scale) in out_rows
                        .chunks_exact_mut(dim)
                        .zip(code_rows.chunks_exact(dim))
                        .zip(row_scales)
                    {
                        let scale = scale.to_f32();
                        for (o, &c) in out_row.iter_mut().zip(code_row) {
                            *o = convert(C::decode(c) * scale);
                        }
                    }
                });
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::kv_cache::{new_store, DenseKvStore, KV_CHUNK_TOKENS};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const HEADS: usize = 3;
    const DIM: usize = 64;
    /// f16 rounding of a (normal) scale: when it rounds down, the row's largest values clip by
    /// up to this fraction of the row's amax.
    const SCALE_ROUNDING: f32 = 1.0 / 2048.0;
    /// int8: half a step (amax / 254) plus scale rounding.
    const INT8_ROW_BOUND: f32 = 0.5 / 127.0 + SCALE_ROUNDING;
    /// E4M3 subnormals (below 2^-6 in scaled units) have a step of 2^-9 scaled units, i.e.
    /// amax × 2^-9 / 448; plus scale rounding.
    const FP8_ROW_BOUND: f32 = 1.0 / 512.0 / 448.0 + SCALE_ROUNDING;
    /// E4M3 normals: 3 mantissa bits, half an ulp is at most 2^-4 of the value.
    const FP8_ELEM_BOUND: f32 = 1.0 / 16.0;

    fn layout(max_tokens: usize) -> KvLayout {
        KvLayout {
            kv_heads: HEADS,
            head_dim: DIM,
            max_tokens,
        }
    }

    /// Gaussian-ish activations with a few huge outliers, some all-zero rows and some tiny rows.
    fn activations(rng: &mut StdRng, tokens: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..HEADS * tokens * DIM)
            .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 2.0)
            .collect();
        for row in data.chunks_mut(DIM) {
            match rng.random_range(0..20) {
                0 => row.fill(0.0),
                1 => row[rng.random_range(0..DIM)] = 900.0 * if rng.random() { 1.0 } else { -1.0 },
                2 => row.iter_mut().for_each(|v| *v *= 1e-2),
                _ => {}
            }
        }
        data
    }

    fn tensor(data: &[f32], tokens: usize) -> Tensor {
        Tensor::from_slice(data, (1, HEADS, tokens, DIM), &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Checks every element of `got` against `want` (both `[heads][tokens][dim]`): within
    /// `rel_row × amax(row)` plus `rel_elem × |want|`; zero rows must come back exactly zero.
    fn assert_close_per_row(got: &[f32], want: &[f32], rel_row: f32, rel_elem: f32) {
        assert_eq!(got.len(), want.len());
        for (g_row, w_row) in got.chunks(DIM).zip(want.chunks(DIM)) {
            let amax = w_row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in g_row.iter().zip(w_row) {
                let bound = rel_row * amax + rel_elem * w.abs();
                assert!(
                    (g - w).abs() <= bound,
                    "got {g}, want {w}, bound {bound}, row amax {amax}"
                );
                if amax == 0.0 {
                    assert_eq!(*g, 0.0);
                }
            }
        }
    }

    /// Appends `tokens` tokens in steps of `step` (V = -K); returns the last K the store handed
    /// back and every K written, flattened.
    fn fill(
        store: &mut dyn KvStore,
        rng: &mut StdRng,
        tokens: usize,
        step: usize,
    ) -> (Tensor, Vec<f32>) {
        let mut chunks = Vec::new();
        let mut last = None;
        for start in (0..tokens).step_by(step) {
            let t = step.min(tokens - start);
            let data = activations(rng, t);
            let k = tensor(&data, t);
            let v = k.neg().unwrap();
            let (kc, vc) = store.append(&k, &v).unwrap();
            assert_eq!(kc.dims4().unwrap(), (1, HEADS, start + t, DIM));
            assert_eq!(flat(&kc.neg().unwrap()), flat(&vc));
            chunks.push(k);
            last = Some(kc);
        }
        (last.unwrap(), flat(&Tensor::cat(&chunks, 2).unwrap()))
    }

    #[test]
    fn int8_round_trip_is_within_half_a_step_per_row() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut store = Int8KvStore::new(layout(1024), DType::F32, &Device::Cpu).unwrap();
        let (got, want) = fill(&mut store, &mut rng, 300, 37);
        // Half a step (amax / 254) plus the f16 rounding of the scale that clamping can cost.
        assert_close_per_row(&flat(&got), &want, INT8_ROW_BOUND, 0.0);
    }

    #[test]
    fn fp8_round_trip_is_within_e4m3_precision() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut store = Fp8KvStore::new(layout(1024), DType::F32, &Device::Cpu).unwrap();
        let (got, want) = fill(&mut store, &mut rng, 300, 41);
        assert_close_per_row(&flat(&got), &want, FP8_ROW_BOUND, FP8_ELEM_BOUND);
    }

    #[test]
    fn fp8_fast_decode_matches_the_reference_for_every_byte() {
        for code in 0..=255u8 {
            let want = F8E4M3::from_bits(code).to_f32();
            let got = Fp8Codec::decode(code);
            if want.is_nan() {
                assert!(
                    got.is_nan() || got.abs() == 480.0,
                    "code {code:#04x}: {got}"
                );
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "code {code:#04x}: {got} vs {want}"
                );
            }
        }
        // And the encoder never writes a NaN code, even for huge or infinite inputs.
        for v in [448.0f32, 500.0, 1e30, f32::INFINITY, -f32::INFINITY] {
            assert!(
                !F8E4M3::from_bits(Fp8Codec::encode(v)).to_f32().is_nan(),
                "{v}"
            );
        }
    }

    #[test]
    fn fp8_handles_values_far_beyond_448() {
        let data: Vec<f32> = (0..HEADS * DIM)
            .map(|i| (i as f32 - 90.0) * 1.0e4)
            .collect();
        let mut store = Fp8KvStore::new(layout(8), DType::F32, &Device::Cpu).unwrap();
        let k = tensor(&data, 1);
        let (got, _) = store.append(&k, &k).unwrap();
        assert_close_per_row(&flat(&got), &data, FP8_ROW_BOUND, FP8_ELEM_BOUND);
        assert!(flat(&got).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn int8_zero_rows_and_zero_cache_decode_to_exact_zeros() {
        let mut store = Int8KvStore::new(layout(8), DType::F32, &Device::Cpu).unwrap();
        let zeros = Tensor::zeros((1, HEADS, 2, DIM), DType::F32, &Device::Cpu).unwrap();
        let (k, v) = store.append(&zeros, &zeros).unwrap();
        assert!(flat(&k).iter().chain(flat(&v).iter()).all(|&x| x == 0.0));
    }

    #[test]
    fn host_and_tensor_op_paths_agree_bit_for_bit() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let mut rng = StdRng::seed_from_u64(3);
            let mut host = Int8KvStore::new(layout(600), dtype, &Device::Cpu).unwrap();
            let mut ops = Int8KvStore::new(layout(600), dtype, &Device::Cpu)
                .unwrap()
                .with_tensor_ops();
            let mut fp8_host = Fp8KvStore::new(layout(600), dtype, &Device::Cpu).unwrap();
            let mut fp8_ops = Fp8KvStore::new(layout(600), dtype, &Device::Cpu)
                .unwrap()
                .with_tensor_ops();
            for t in [5, 1, 1, 300, 1] {
                let data = activations(&mut rng, t);
                let k = tensor(&data, t).to_dtype(dtype).unwrap();
                let v = (&k * -0.5).unwrap();
                let pairs: [(&mut dyn KvStore, &mut dyn KvStore); 2] =
                    [(&mut host, &mut ops), (&mut fp8_host, &mut fp8_ops)];
                for (a, b) in pairs {
                    let (ka, va) = a.append(&k, &v).unwrap();
                    let (kb, vb) = b.append(&k, &v).unwrap();
                    assert_eq!(ka.dtype(), dtype);
                    assert_eq!(flat(&ka), flat(&kb));
                    assert_eq!(flat(&va), flat(&vb));
                }
            }
        }
    }

    #[test]
    fn grows_by_whole_chunks_and_keeps_contents() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut store = Int8KvStore::new(layout(1000), DType::F32, &Device::Cpu).unwrap();
        let per_token = 2 * HEADS * (DIM + KV_SCALE_BYTES);
        let first = activations(&mut rng, 1);
        store
            .append(&tensor(&first, 1), &tensor(&first, 1))
            .unwrap();
        assert_eq!(store.allocated_bytes(), KV_CHUNK_TOKENS * per_token);
        for _ in 1..KV_CHUNK_TOKENS {
            let d = activations(&mut rng, 1);
            store.append(&tensor(&d, 1), &tensor(&d, 1)).unwrap();
        }
        assert_eq!(store.allocated_bytes(), KV_CHUNK_TOKENS * per_token);
        let d = activations(&mut rng, 1);
        let (k, _) = store.append(&tensor(&d, 1), &tensor(&d, 1)).unwrap();
        assert_eq!(store.allocated_bytes(), 2 * KV_CHUNK_TOKENS * per_token);
        // The first token survived the growth.
        let first_back: Vec<f32> = (0..HEADS)
            .flat_map(|h| flat(&k.narrow(1, h, 1).unwrap().narrow(2, 0, 1).unwrap()))
            .collect();
        assert_close_per_row(&first_back, &first, INT8_ROW_BOUND, 0.0);
        // Capped at max_tokens, then full.
        let big = activations(&mut rng, 1000 - 257);
        store
            .append(&tensor(&big, 1000 - 257), &tensor(&big, 1000 - 257))
            .unwrap();
        assert_eq!(store.allocated_bytes(), 1000 * per_token);
        let err = store.append(&tensor(&d, 1), &tensor(&d, 1)).unwrap_err();
        assert!(err.to_string().contains("context limit of 1000"), "{err}");
    }

    #[test]
    fn truncate_and_clear_rewind_without_freeing() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut store = Fp8KvStore::new(layout(64), DType::F32, &Device::Cpu).unwrap();
        let (full, _) = fill(&mut store, &mut rng, 10, 10);
        let bytes = store.allocated_bytes();
        store.truncate(4);
        assert_eq!(store.len(), 4);
        let d = activations(&mut rng, 1);
        let (k, _) = store.append(&tensor(&d, 1), &tensor(&d, 1)).unwrap();
        assert_eq!(k.dim(2).unwrap(), 5);
        assert_eq!(
            flat(&k.narrow(2, 0, 4).unwrap()),
            flat(&full.narrow(2, 0, 4).unwrap())
        );
        store.clear();
        assert!(store.is_empty());
        assert_eq!(store.allocated_bytes(), bytes);
    }

    #[test]
    fn quantized_stores_use_at_most_055_of_f16_and_03_of_f32() {
        let ctx = 4096;
        let mut rng = StdRng::seed_from_u64(6);
        let data = activations(&mut rng, ctx);
        let x = tensor(&data, ctx);
        let bytes = |profile: KvProfile, dtype: DType| {
            let mut store = new_store(profile, layout(ctx), dtype, &Device::Cpu).unwrap();
            let x = x.to_dtype(dtype).unwrap();
            store.append(&x, &x).unwrap();
            store.allocated_bytes()
        };
        let f16_bytes = bytes(KvProfile::Default, DType::F16);
        let f32_bytes = bytes(KvProfile::Default, DType::F32);
        assert_eq!(f32_bytes, 2 * f16_bytes);
        for profile in KvProfile::QUANTIZED {
            let q = bytes(profile, DType::F32);
            assert_eq!(q, profile.kv_bytes_per_token(1, HEADS, DIM, 4) * ctx);
            assert!(
                q as f64 <= 0.55 * f16_bytes as f64,
                "{profile}: {q} vs f16 {f16_bytes}"
            );
            assert!(
                q as f64 <= 0.30 * f32_bytes as f64,
                "{profile}: {q} vs f32 {f32_bytes}"
            );
        }
        let dense = DenseKvStore::new(layout(ctx), DType::F16, &Device::Cpu);
        assert_eq!(dense.allocated_bytes(), 0);
    }

    #[test]
    fn write_then_contents_exposes_the_stored_codes_and_scales() {
        let mut store = Int8KvStore::new(layout(300), DType::F32, &Device::Cpu).unwrap();
        assert!(store.contents().is_none());
        // One row: 0, 1, ..., 63 → amax 63, scale f16(63/127), code of 63 is 127 (+128 = 255).
        let row: Vec<f32> = (0..HEADS * DIM).map(|i| (i % DIM) as f32).collect();
        store
            .write(&tensor(&row, 1), &tensor(&row, 1).neg().unwrap())
            .unwrap();
        assert_eq!(store.len(), 1);
        let Some(KvContents::Quantized {
            profile,
            k_codes,
            k_scales,
            v_codes,
            ..
        }) = store.contents()
        else {
            panic!("expected quantized contents");
        };
        assert_eq!(profile, KvProfile::KvInt8);
        assert_eq!(k_codes.dims4().unwrap(), (1, HEADS, KV_CHUNK_TOKENS, DIM));
        assert_eq!(k_scales.dims4().unwrap(), (1, HEADS, KV_CHUNK_TOKENS, 1));
        let k0: Vec<u8> = k_codes
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let v0: Vec<u8> = v_codes
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!((k0[0], k0[DIM - 1], v0[DIM - 1]), (128, 255, 1));
        let s0 = k_scales
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f16>()
            .unwrap();
        assert!(s0.iter().all(|s| *s == f16::from_f32(63.0 / 127.0)));
    }

    #[test]
    fn rejects_wrong_shapes_with_a_clear_error() {
        let mut store = Int8KvStore::new(layout(8), DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::zeros((1, HEADS + 1, 1, DIM), DType::F32, &Device::Cpu).unwrap();
        let err = store.append(&bad, &bad).unwrap_err().to_string();
        assert!(
            err.contains("kv_int8 KV cache expects K and V of shape"),
            "{err}"
        );
    }

    #[test]
    fn fp8_is_refused_on_metal_with_alternatives() {
        let cpu = DeviceLocation::Cpu;
        let cuda = DeviceLocation::Cuda { gpu_id: 0 };
        let metal = DeviceLocation::Metal { gpu_id: 1 };
        for profile in [KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8] {
            check_kv_profile_on_device(profile, cpu).unwrap();
            check_kv_profile_on_device(profile, cuda).unwrap();
        }
        check_kv_profile_on_device(KvProfile::KvInt8, metal).unwrap();
        let err = check_kv_profile_on_device(KvProfile::KvFp8, metal).unwrap_err();
        assert!(matches!(err, QuantError::Unsupported { .. }));
        let err = err.to_string();
        assert!(
            err.starts_with("unsupported quantization 'kv_fp8' for device metal:1: "),
            "{err}"
        );
        assert!(err.contains("use kv_int8"), "{err}");
        // The same decision from the `--device` spelling, before a device is opened.
        let request = |s: &str| s.parse::<DeviceRequest>().unwrap();
        let err = check_kv_profile_on_request(KvProfile::KvFp8, request("metal")).unwrap_err();
        assert!(err.to_string().contains("for device metal:0"), "{err}");
        for ok in ["auto", "cpu", "cuda:1"] {
            check_kv_profile_on_request(KvProfile::KvFp8, request(ok)).unwrap();
        }
        check_kv_profile_on_request(KvProfile::KvInt8, request("metal:2")).unwrap();
    }
}
