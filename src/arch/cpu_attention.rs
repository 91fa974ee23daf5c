//! Attention of a sequence's new tokens over its cached keys/values, on the CPU.
//!
//! Every query row is computed the same way whatever the batch or the prompt chunking: one pass
//! over the visible keys of its KV head and one over the values, read in place from the cache's
//! blocks (strided views are fine), the causal limit and the sliding window applied as a key
//! range instead of a mask, optional per-head attention sinks (gpt-oss) in the softmax. The
//! general path (candle GEMMs over `q·Kᵀ` plus a mask) gives the same values up to rounding, but
//! its rounding depends on how many rows it multiplies at once; with 8-bit activations
//! downstream a last-bit difference can flip a rounding, so batching or chunking would change
//! results. It also skips copying the cache out and building masks.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

use super::cpu_matmul::for_each_chunk;

/// Keys/values `[1, kv_heads, len, head_dim]` as a flat slice: the start of KV head 0 and the
/// distance between heads; rows of one head must be `head_dim` apart with unit element stride.
struct KvView<'a> {
    data: &'a [f32],
    head_stride: usize,
}

/// `Some([1, t, heads · head_dim])` — each query's heads side by side — for the `t` queries
/// `q` `[1, heads, t, head_dim]` (the last `t` tokens of the sequence) over the keys/values of
/// `segments` (the blocks of the sequence's cache, in order, each `[1, kv_heads, n_i, head_dim]`,
/// f32 on the CPU). Query `i` sits at position `len − t + i` and sees the keys up to its own
/// position, only the last `window` of them with a sliding window. Query head `h` reads KV head
/// `h / (heads / kv_heads)`. `sinks` (one logit per head) join each softmax and take their share
/// of the probability mass without a value. `None` when the tensors are not laid out for this
/// path (other dtypes or devices, unusual strides): the caller then takes the general path.
pub(crate) fn cpu_attention(
    q: &Tensor,
    segments: &[(Tensor, Tensor)],
    window: Option<usize>,
    sinks: Option<&[f32]>,
) -> Result<Option<Tensor>> {
    let (_, heads, t, dim) = q.dims4()?;
    let Some((first_k, _)) = segments.first() else {
        return Ok(None);
    };
    let kv_heads = first_k.dim(1)?;
    if heads % kv_heads != 0 || sinks.is_some_and(|s| s.len() != heads) {
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
    if len < t || t == 0 {
        return Ok(None);
    }
    let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; t * heads * dim];
    // One task per (query, head): output row `i · heads + h`.
    for_each_chunk(&mut out, dim, |c, o| {
        let (i, h) = (c / heads, c % heads);
        let kv = h / group;
        let last = len - t + i;
        let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
        // The visible rows of each block, as (keys, values) slices.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut at = 0;
        for (keys, values, n) in &blocks {
            let (lo, hi) = (first.max(at), (last + 1).min(at + n));
            if lo < hi {
                let k_rows = &keys.data[kv * keys.head_stride..][..n * dim];
                let v_rows = &values.data[kv * values.head_stride..][..n * dim];
                parts.push((
                    &k_rows[(lo - at) * dim..(hi - at) * dim],
                    &v_rows[(lo - at) * dim..(hi - at) * dim],
                ));
            }
            at += n;
        }
        let q_row = &qs[(h * t + i) * dim..(h * t + i + 1) * dim];
        attend(q_row, &parts, scale, sinks.map(|s| s[h]), o);
    });
    Ok(Some(Tensor::from_vec(
        out,
        (1, t, heads * dim),
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

/// softmax(q·kᵢ · scale, with an optional sink logit) weighted sum of the value rows over all
/// `parts`, into `out`; AVX2 when the CPU has it.
fn attend(q: &[f32], parts: &[Rows<'_>], scale: f32, sink: Option<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_matmul::has_avx2_fma_f16c() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { attend_avx2(q, parts, scale, sink, out) };
    }
    attend_portable(q, parts, scale, sink, out)
}

/// [`attend_portable`] compiled for AVX2: the same code, vectorized eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    q: &[f32],
    parts: &[Rows<'_>],
    scale: f32,
    sink: Option<f32>,
    out: &mut [f32],
) {
    attend_portable(q, parts, scale, sink, out)
}

#[inline(always)]
fn attend_portable(q: &[f32], parts: &[Rows<'_>], scale: f32, sink: Option<f32>, out: &mut [f32]) {
    let dim = q.len();
    // A plain loop, not `flat_map(..).map(dot).collect()`: that iterator's `next` was compiled
    // out of line, without AVX2, so the key dots ran as SSE (~6 % of SmolLM2 decode at depth
    // 128). Same arithmetic either way.
    let mut scores = Vec::with_capacity(parts.iter().map(|(k, _)| k.len() / dim).sum());
    for (keys, _) in parts {
        for k in keys.chunks_exact(dim) {
            scores.push(dot(q, k) * scale);
        }
    }
    let max = scores
        .iter()
        .fold(sink.unwrap_or(f32::NEG_INFINITY), |m, &s| m.max(s));
    let mut sum = sink.map_or(0f32, |s| (s - max).exp());
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    let mut p = scores.iter();
    for (_, values) in parts {
        for (v, p) in values.chunks_exact(dim).zip(&mut p) {
            let w = p / sum;
            for (o, &x) in out.iter_mut().zip(v) {
                *o += w * x;
            }
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
            let ours = cpu_attention(&q, &[(k.clone(), v.clone())], window, None)
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
                cpu_attention(&q, &segs, window, None).unwrap().unwrap()
            } else {
                ours.clone()
            };
            let want = reference(&q, &k, &v, window);
            let diff = max_abs(&(ours - &want).unwrap());
            assert!(diff < 1e-5, "heads {heads}/{kv_heads}, len {len}: {diff}");
            let diff = max_abs(&(split - &want).unwrap());
            assert!(
                diff < 1e-5,
                "split: heads {heads}/{kv_heads}, len {len}: {diff}"
            );
        }
    }

    /// Causal (and windowed) attention of the last `t` positions with optional sinks, by masked
    /// softmax over repeated KV heads: `[1, t, heads · dim]`.
    fn reference_many(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        sinks: Option<&[f32]>,
    ) -> Tensor {
        let (_, heads, t, dim) = q.dims4().unwrap();
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
            crate::arch::mask::causal_mask(len - t..len, 0..len, window, &Device::Cpu, DType::F32)
                .unwrap();
        let mut scores = scores.broadcast_add(&mask).unwrap();
        if let Some(s) = sinks {
            let s = Tensor::from_slice(s, (1, heads, 1, 1), &Device::Cpu)
                .unwrap()
                .broadcast_as((1, heads, t, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            scores = Tensor::cat(&[&scores, &s], 3).unwrap();
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .narrow(3, 0, len)
            .unwrap()
            .contiguous()
            .unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((1, t, heads * dim))
            .unwrap()
    }

    #[test]
    fn many_queries_over_blocks_match_a_masked_softmax_with_and_without_sinks() {
        let dev = Device::Cpu;
        for (heads, kv_heads, len, t, dim, window) in [
            (9, 3, 40, 40, 64, None),
            (4, 2, 70, 7, 16, Some(16)),
            (8, 8, 33, 33, 8, Some(5)),
            (2, 1, 64, 1, 32, None),
        ] {
            let k = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, kv_heads, len, dim), &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (1, heads, t, dim), &dev).unwrap();
            // The cache in blocks of 16 tokens.
            let segs: Vec<(Tensor, Tensor)> = (0..len)
                .step_by(16)
                .map(|a| {
                    let n = 16.min(len - a);
                    (k.narrow(2, a, n).unwrap(), v.narrow(2, a, n).unwrap())
                })
                .collect();
            let sinks: Vec<f32> = (0..heads).map(|h| h as f32 * 0.5 - 1.0).collect();
            for sink in [None, Some(sinks.as_slice())] {
                let ours = cpu_attention(&q, &segs, window, sink).unwrap().unwrap();
                let want = reference_many(&q, &k, &v, window, sink);
                let diff = max_abs(&(ours - want).unwrap());
                assert!(diff < 1e-5, "{heads}/{kv_heads} len {len} t {t}: {diff}");
            }
            // A query row's result does not depend on how many rows ran with it.
            let all = cpu_attention(&q, &segs, window, None).unwrap().unwrap();
            let last = cpu_attention(&q.narrow(2, t - 1, 1).unwrap(), &segs, window, None)
                .unwrap()
                .unwrap();
            let row = all.narrow(1, t - 1, 1).unwrap();
            assert_eq!(
                row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                last.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let q16 = Tensor::zeros((1, 2, 1, 8), DType::F16, &dev).unwrap();
        assert!(cpu_attention(&q16, &[(k.clone(), k.clone())], None, None)
            .unwrap()
            .is_none());
        // Keys transposed in memory (element stride ≠ 1).
        let kt = Tensor::zeros((1, 2, 8, 4), DType::F32, &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let q = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        assert!(cpu_attention(&q, &[(kt.clone(), kt)], None, None)
            .unwrap()
            .is_none());
    }
}
