//! Attention of one new token over the cached keys/values, on the CPU (the decode step).
//!
//! The general path builds `q·Kᵀ` with candle's GEMM on a `[n_rep, len]` product per KV head, adds
//! a mask, runs softmax and a second GEMM after copying V out of the cache: at a few hundred tokens
//! of context that cost more than the layer's weights. Here each query head makes one pass over
//! its KV head's keys and one over its values, read in place from the cache's buffer (strided
//! views are fine), with the sliding window applied as a key range instead of a mask.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

use super::cpu_matmul::for_each_chunk;

/// Keys/values `[1, kv_heads, len, head_dim]` as a flat slice: the start of KV head 0 and the
/// distance between heads; rows of one head must be `head_dim` apart with unit element stride.
struct KvView<'a> {
    data: &'a [f32],
    head_stride: usize,
}

/// `Some([1, 1, heads · head_dim])` — the heads' outputs side by side — for a single query
/// `q` `[1, heads, 1, head_dim]` over the keys/values of `segments` (the blocks of a sequence's
/// cache, in order, each `[1, kv_heads, n_i, head_dim]` f32 CPU tensors). Query head `h` reads KV
/// head `h / (heads / kv_heads)`; with a sliding `window` only the last `window` keys are visible.
/// `None` when the tensors are not laid out for this path (other dtypes or devices, unusual
/// strides): the caller then takes the general path.
pub(crate) fn decode_attention(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let (_, heads, t, dim) = q.dims4()?;
    let Some((first_k, _)) = segments.first() else {
        return Ok(None);
    };
    let kv_heads = first_k.dim(1)?;
    if t != 1 || heads % kv_heads != 0 {
        return Ok(None);
    }
    let cpu_f32 = |x: &Tensor| x.device().is_cpu() && x.dtype() == DType::F32;
    if !cpu_f32(q) {
        return Ok(None);
    }
    let mut storages = Vec::with_capacity(segments.len());
    for (k, v) in segments {
        let (_, kvh, n, kdim) = k.dims4()?;
        if kvh != kv_heads || kdim != dim || v.dims() != k.dims() || !cpu_f32(k) || !cpu_f32(v) {
            return Ok(None);
        }
        storages.push((k.storage_and_layout(), v.storage_and_layout(), n));
    }
    let mut blocks = Vec::with_capacity(storages.len());
    for ((ks, kl), (vs, vl), n) in &storages {
        let (Storage::Cpu(k_cpu), Storage::Cpu(v_cpu)) = (&**ks, &**vs) else {
            return Ok(None);
        };
        let (Some(keys), Some(values)) = (
            kv_view(k_cpu, kl, kv_heads, *n, dim),
            kv_view(v_cpu, vl, kv_heads, *n, dim),
        ) else {
            return Ok(None);
        };
        blocks.push((keys, values, *n));
    }
    let len: usize = blocks.iter().map(|b| b.2).sum();
    if len == 0 {
        return Ok(None);
    }
    let qs = q.flatten_all()?.to_vec1::<f32>()?;
    let first = window.map_or(0, |w| len.saturating_sub(w));
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; heads * dim];
    for_each_chunk(&mut out, dim, |h, o| {
        let kv = h / group;
        // The visible rows of each block, as (keys, values) slices.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut at = 0;
        for (keys, values, n) in &blocks {
            let skip = first.saturating_sub(at).min(*n);
            if skip < *n {
                let k_rows = &keys.data[kv * keys.head_stride..][..n * dim];
                let v_rows = &values.data[kv * values.head_stride..][..n * dim];
                parts.push((&k_rows[skip * dim..], &v_rows[skip * dim..]));
            }
            at += n;
        }
        attend(&qs[h * dim..(h + 1) * dim], &parts, scale, o);
    });
    Ok(Some(Tensor::from_vec(
        out,
        (1, 1, heads * dim),
        q.device(),
    )?))
}

/// The flat view of a `[1, kv_heads, len, dim]` cache tensor, if its rows are `dim` apart with
/// unit element stride (the head stride may be the cache capacity).
fn kv_view<'a>(
    cpu: &'a CpuStorage,
    layout: &Layout,
    kv_heads: usize,
    len: usize,
    dim: usize,
) -> Option<KvView<'a>> {
    let s = layout.stride();
    if (len > 1 && s[2] != dim) || (dim > 1 && s[3] != 1) {
        return None;
    }
    let data = &cpu.as_slice::<f32>().ok()?[layout.start_offset()..];
    let head_stride = if kv_heads > 1 { s[1] } else { 0 };
    (data.len() >= (kv_heads - 1) * head_stride + len * dim).then_some(KvView { data, head_stride })
}

/// Visible keys and values of one block: rows of `dim` floats.
type Rows<'a> = (&'a [f32], &'a [f32]);

/// softmax(q·kᵢ · scale) weighted sum of the value rows over all `parts`, into `out`; AVX2 when
/// the CPU has it.
fn attend(q: &[f32], parts: &[Rows<'_>], scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_matmul::has_avx2_fma_f16c() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { attend_avx2(q, parts, scale, out) };
    }
    attend_portable(q, parts, scale, out)
}

/// [`attend_portable`] compiled for AVX2: the same code, vectorized eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], parts: &[Rows<'_>], scale: f32, out: &mut [f32]) {
    attend_portable(q, parts, scale, out)
}

#[inline(always)]
fn attend_portable(q: &[f32], parts: &[Rows<'_>], scale: f32, out: &mut [f32]) {
    let dim = q.len();
    let mut scores: Vec<f32> = parts
        .iter()
        .flat_map(|(keys, _)| keys.chunks_exact(dim))
        .map(|k| dot(q, k) * scale)
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    let values = parts.iter().flat_map(|(_, values)| values.chunks_exact(dim));
    for (p, v) in scores.iter().zip(values) {
        let w = p / sum;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
}

/// Dot product in eight independent lanes (vectorizes without reassociating a single sum).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::super::cpu_matmul::max_abs;
    use super::*;
    use candle_core::Device;

    /// The general path: GQA by repeating KV heads, causal + window mask for the last query.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
        let (_, heads, _, dim) = q.dims4().unwrap();
        let (_, kv_heads, len, _) = k.dims4().unwrap();
        let group = heads / kv_heads;
        let repeat = |x: &Tensor| {
            let parts: Vec<Tensor> = (0..heads)
                .map(|h| x.narrow(1, h / group, 1).unwrap())
                .collect();
            Tensor::cat(&parts, 1).unwrap().contiguous().unwrap()
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (dim as f64).sqrt()).unwrap();
        let mask =
            crate::arch::mask::causal_mask(len - 1..len, 0..len, window, &Device::Cpu, DType::F32)
                .unwrap();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .reshape((1, 1, heads * dim))
            .unwrap()
    }

    #[test]
    fn matches_the_general_path_on_cache_views() {
        let dev = Device::Cpu;
        for (heads, kv_heads, len, dim, window) in [
            (9, 3, 37, 64, None),
            (4, 4, 5, 16, None),
            (8, 2, 40, 12, Some(16)),
            (2, 1, 1, 8, None),
            (6, 3, 20, 32, Some(64)),
        ] {
            // The cache holds more slots than tokens: `len` of `capacity` are a strided view.
            let capacity = len + 11;
            let kc = Tensor::randn(0f32, 1.0, (1, kv_heads, capacity, dim), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (1, kv_heads, capacity, dim), &dev).unwrap();
            let (k, v) = (kc.narrow(2, 0, len).unwrap(), vc.narrow(2, 0, len).unwrap());
            let q = Tensor::randn(0f32, 1.0, (1, heads, 1, dim), &dev).unwrap();
            let ours = decode_attention(&q, &[(k.clone(), v.clone())], window)
                .unwrap()
                .unwrap();
            // The same keys split into blocks give the same result.
            let cut = len / 3;
            let split = if cut > 0 {
                let parts = [(0, cut), (cut, len - cut)];
                let segs: Vec<(Tensor, Tensor)> = parts
                    .iter()
                    .map(|&(a, n)| (k.narrow(2, a, n).unwrap(), v.narrow(2, a, n).unwrap()))
                    .collect();
                decode_attention(&q, &segs, window).unwrap().unwrap()
            } else {
                ours.clone()
            };
            let want = reference(&q, &k, &v, window);
            let diff = max_abs(&(ours - &want).unwrap());
            assert!(diff < 1e-5, "heads {heads}/{kv_heads}, len {len}: {diff}");
            let diff = max_abs(&(split - &want).unwrap());
            assert!(diff < 1e-5, "split: heads {heads}/{kv_heads}, len {len}: {diff}");
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let two_queries = Tensor::zeros((1, 2, 2, 8), DType::F32, &dev).unwrap();
        assert!(decode_attention(&two_queries, &[(k.clone(), k.clone())], None)
            .unwrap()
            .is_none());
        let q16 = Tensor::zeros((1, 2, 1, 8), DType::F16, &dev).unwrap();
        assert!(decode_attention(&q16, &[(k.clone(), k.clone())], None).unwrap().is_none());
        // Keys transposed in memory (element stride ≠ 1).
        let kt = Tensor::zeros((1, 2, 8, 4), DType::F32, &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let q = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        assert!(decode_attention(&q, &[(kt.clone(), kt)], None).unwrap().is_none());
    }
}
