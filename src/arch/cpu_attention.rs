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

/// `Some([1, t, heads * head_dim])`, each query's heads side by side, for the `t` queries
/// `q` `[1, heads, t, head_dim]` (the last `t` tokens of the sequence) over the keys/values of
/// `segments` (the blocks of the sequence's cache, in order, each `[1, kv_heads, n_i, head_dim]`,
/// f32 on the CPU). Query `i` sits at position `len - t + i` and sees the keys up to its own
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
    let t = q.dim(2)?;
    let seq = SeqQueries {
        segments,
        offset: 0,
        len: t,
    };
    cpu_attention_batch(q, &[seq], window, sinks)
}

/// One sequence of a batched attention call: its cache blocks (its new keys/values already
/// written) and its queries, rows `offset..offset + len` of the batch.
pub(crate) struct SeqQueries<'a> {
    pub segments: &'a [(Tensor, Tensor)],
    pub offset: usize,
    pub len: usize,
}

/// [`cpu_attention`] for the sequences of a batch at once: `q` `[1, heads, T, head_dim]` holds
/// every sequence's queries (`T` = the sum of their lengths), the result is
/// `[1, T, heads * head_dim]`. One parallel pass over all (query, KV head) pairs of the batch:
/// no per-sequence copies of the queries or outputs, and work enough to keep every thread busy
/// when each sequence decodes one token.
pub(crate) fn cpu_attention_batch(
    q: &Tensor,
    seqs: &[SeqQueries<'_>],
    window: Option<usize>,
    sinks: Option<&[f32]>,
) -> Result<Option<Tensor>> {
    let (_, heads, total_rows, dim) = q.dims4()?;
    let Some((first_k, _)) = seqs.first().and_then(|s| s.segments.first()) else {
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
    let mut storages = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let mut blocks = Vec::with_capacity(seq.segments.len());
        for (k, v) in seq.segments {
            let (_, kvh, n, kdim) = k.dims4()?;
            if kvh != kv_heads || kdim != dim || v.dims() != k.dims() || !cpu_f32(k) || !cpu_f32(v)
            {
                return Ok(None);
            }
            blocks.push((k.storage_and_layout(), v.storage_and_layout(), n));
        }
        storages.push(blocks);
    }
    // Per sequence: its blocks as flat views, its length, its first row and query count.
    let mut views = Vec::with_capacity(seqs.len());
    let mut row_seq = vec![usize::MAX; total_rows];
    for (seq, blocks) in seqs.iter().zip(&storages) {
        let mut parts = Vec::with_capacity(blocks.len());
        for ((ks, kl), (vs, vl), n) in blocks {
            let (Storage::Cpu(k_cpu), Storage::Cpu(v_cpu)) = (&**ks, &**vs) else {
                return Ok(None);
            };
            let (Some(keys), Some(values)) = (
                kv_view(k_cpu, kl, kv_heads, *n, dim),
                kv_view(v_cpu, vl, kv_heads, *n, dim),
            ) else {
                return Ok(None);
            };
            parts.push((keys, values, *n));
        }
        let len: usize = parts.iter().map(|b| b.2).sum();
        let rows = seq.offset..seq.offset + seq.len;
        if len < seq.len || seq.len == 0 || rows.end > total_rows {
            return Ok(None);
        }
        for r in rows {
            if row_seq[r] != usize::MAX {
                return Ok(None);
            }
            row_seq[r] = views.len();
        }
        views.push((parts, len, seq.offset, seq.len));
    }
    if row_seq.contains(&usize::MAX) {
        return Ok(None);
    }
    let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; total_rows * heads * dim];
    // One task per query and `sub` query heads of one KV head (outputs side by side): whole
    // groups share each key/value load, but split finer when that leaves too few tasks for the
    // threads (one sequence decoding one token).
    let threads = rayon::current_num_threads();
    let sub = (1..=group.min(4))
        .rev()
        .find(|&g| group % g == 0 && total_rows * heads / g >= 4 * threads)
        .unwrap_or(1);
    for_each_chunk(&mut out, sub * dim, |c, o| {
        let (row, first_head) = (c / (heads / sub), c % (heads / sub) * sub);
        let kv = first_head / group;
        let (blocks, len, offset, t) = &views[row_seq[row]];
        let last = len - t + (row - offset);
        let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
        // The visible rows of each block, as (keys, values) slices.
        let mut parts = Vec::with_capacity(blocks.len());
        let mut at = 0;
        for (keys, values, n) in blocks {
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
        let q_row = |h: usize| &qs[(h * total_rows + row) * dim..(h * total_rows + row + 1) * dim];
        let sink = |h: usize| sinks.map(|s| s[h]);
        #[cfg(target_arch = "x86_64")]
        if dim % 16 == 0 && super::cpu_matmul::has_avx512f() {
            // This task's query heads (they share the KV head), up to four at a time: each key
            // and value row is loaded once for all of them.
            let mut j = 0;
            while j < sub {
                let g = (sub - j).min(4);
                let o_g = &mut o[j * dim..(j + g) * dim];
                let h = first_head + j;
                macro_rules! run {
                    ($g:literal) => {{
                        let qg: [&[f32]; $g] = std::array::from_fn(|i| q_row(h + i));
                        let sg: [Option<f32>; $g] = std::array::from_fn(|i| sink(h + i));
                        // SAFETY: AVX-512 F, AVX2 and FMA were detected; rows are `dim` long.
                        unsafe { attend_avx512::<$g>(qg, &parts, scale, sg, o_g) }
                    }};
                }
                match g {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
                j += g;
            }
            return;
        }
        for (j, o_h) in o.chunks_exact_mut(dim).enumerate() {
            attend(
                q_row(first_head + j),
                &parts,
                scale,
                sink(first_head + j),
                o_h,
            );
        }
    });
    Ok(Some(Tensor::from_vec(
        out,
        (1, total_rows, heads * dim),
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
    if q.len() % 16 == 0 && super::cpu_matmul::has_avx512f() {
        // SAFETY: AVX-512 F, AVX2 and FMA were detected at run time; `out` has `q.len()`
        // elements and every part's rows are `q.len()` long (checked by the caller's views).
        return unsafe { attend_avx512::<1>([q], parts, scale, [sink], out) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::cpu_matmul::has_avx2_fma_f16c() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { attend_avx2(q, parts, scale, sink, out) };
    }
    attend_portable::<false>(q, parts, scale, sink, out)
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
    attend_portable::<true>(q, parts, scale, sink, out)
}

/// The attention of one query row. `AVX2`: the key dots and the value sums use explicit AVX2
/// code (the caller has checked the CPU); it does the same operations in the same order as the
/// portable code, so both give the same values.
#[inline(always)]
fn attend_portable<const AVX2: bool>(
    q: &[f32],
    parts: &[Rows<'_>],
    scale: f32,
    sink: Option<f32>,
    out: &mut [f32],
) {
    // Plain loops, no iterator adapters: `flat_map(..).map(..).collect()` compiled to a
    // separate, non-inlined `next` outside `attend_avx2`'s target features (SSE code, 11 % of
    // a batched decode).
    let dim = q.len();
    let total: usize = parts.iter().map(|(keys, _)| keys.len() / dim).sum();
    let mut scores = Vec::with_capacity(total);
    for (keys, _) in parts {
        // Four keys at a time: four independent dependency chains for the CPU to overlap, each
        // computed exactly as `dot` computes one.
        let mut quads = keys.chunks_exact(4 * dim);
        for k4 in &mut quads {
            let (k01, k23) = k4.split_at(2 * dim);
            let (k0, k1) = k01.split_at(dim);
            let (k2, k3) = k23.split_at(dim);
            #[cfg(target_arch = "x86_64")]
            let d4 = if AVX2 {
                // SAFETY: `AVX2` is only set by `attend_avx2`, which runs after detection.
                unsafe { avx2::dot4(q, [k0, k1, k2, k3]) }
            } else {
                dot4(q, [k0, k1, k2, k3])
            };
            #[cfg(not(target_arch = "x86_64"))]
            let d4 = dot4(q, [k0, k1, k2, k3]);
            for d in d4 {
                scores.push(d * scale);
            }
        }
        for k in quads.remainder().chunks_exact(dim) {
            scores.push(dot(q, k) * scale);
        }
    }
    softmax_with_sink(&mut scores, sink);
    // Column slices of `COLS` outputs held in registers over all value rows (one pass per slice
    // instead of loading and storing the whole output per row); each output element still sums
    // its rows in order, so the values are those of a plain row-by-row accumulation.
    const COLS: usize = 64;
    for c0 in (0..dim).step_by(COLS) {
        let width = COLS.min(dim - c0);
        let mut acc = [0f32; COLS];
        let mut at = 0;
        for (_, values) in parts {
            for v in values.chunks_exact(dim) {
                let w = scores[at];
                at += 1;
                if width == COLS && AVX2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    unsafe {
                        avx2::add_scaled(&mut acc, w, &v[c0..c0 + COLS]);
                    }
                } else if width == COLS {
                    let v: &[f32; COLS] = v[c0..c0 + COLS].try_into().unwrap();
                    for j in 0..COLS {
                        acc[j] += w * v[j];
                    }
                } else {
                    for j in 0..width {
                        acc[j] += w * v[c0 + j];
                    }
                }
            }
        }
        out[c0..c0 + width].copy_from_slice(&acc[..width]);
    }
}

/// `scores` → their softmax, with an optional sink logit taking its share of the mass.
#[inline(always)]
fn softmax_with_sink(scores: &mut [f32], sink: Option<f32>) {
    let mut max = sink.unwrap_or(f32::NEG_INFINITY);
    for &s in scores.iter() {
        max = max.max(s);
    }
    let mut sum = sink.map_or(0f32, |s| (s - max).exp());
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for w in scores.iter_mut() {
        *w /= sum;
    }
}

/// The attention of `G` query rows that share a KV head, with AVX-512 (head sizes that are
/// multiples of 16): each key and value row is loaded once for the `G` queries, the value sums
/// run sixteen lanes wide. Every operation is the portable path's, in its order (key dots in
/// eight lanes summed in order, multiply then add, never fused), so the values are the same on
/// every CPU and with any `G`: models whose greedy tokens are compared against llama.cpp's
/// sit close enough to ties that a last-bit difference in attention can flip one.
/// `out`: the `G` outputs, `dim` each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512<const G: usize>(
    q: [&[f32]; G],
    parts: &[Rows<'_>],
    scale: f32,
    sinks: [Option<f32>; G],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let dim = q[0].len();
    assert!(dim % 16 == 0 && q.iter().all(|q| q.len() == dim) && out.len() == G * dim);
    let vecs = dim / 16;
    // As `dot`: eight lanes, each summing its products in order, then the lanes in order.
    let lanes_sum = |acc: __m256| {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>() + [0f32; 0].iter().sum::<f32>()
    };
    let total: usize = parts.iter().map(|(keys, _)| keys.len() / dim).sum();
    let mut scores: [Vec<f32>; G] = std::array::from_fn(|_| Vec::with_capacity(total));
    for (keys, _) in parts {
        let rows = keys.len() / dim;
        let kp = keys.as_ptr();
        let mut r = 0;
        if G == 1 {
            // One query: four keys at a time, for four independent chains.
            let qp = q[0].as_ptr();
            while r + 4 <= rows {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..dim / 8 {
                    let x = _mm256_loadu_ps(qp.add(8 * c));
                    for (j, a) in acc.iter_mut().enumerate() {
                        let y = _mm256_loadu_ps(kp.add((r + j) * dim + 8 * c));
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(x, y));
                    }
                }
                for a in acc {
                    scores[0].push(lanes_sum(a) * scale);
                }
                r += 4;
            }
        }
        while r < rows {
            let mut acc = [_mm256_setzero_ps(); G];
            for c in 0..dim / 8 {
                let y = _mm256_loadu_ps(kp.add(r * dim + 8 * c));
                for (a, q) in acc.iter_mut().zip(&q) {
                    let x = _mm256_loadu_ps(q.as_ptr().add(8 * c));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(x, y));
                }
            }
            for (s, a) in scores.iter_mut().zip(acc) {
                s.push(lanes_sum(a) * scale);
            }
            r += 1;
        }
    }
    for (s, sink) in scores.iter_mut().zip(sinks) {
        softmax_with_sink(s, sink);
    }
    // Up to 64 output columns (four registers) per query per pass over the value rows.
    for c0 in (0..vecs).step_by(4) {
        let width = 4.min(vecs - c0);
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        let mut at = 0;
        for (_, values) in parts {
            let vp = values.as_ptr();
            for r in 0..values.len() / dim {
                let mut v = [_mm512_setzero_ps(); 4];
                for (j, v) in v.iter_mut().enumerate().take(width) {
                    *v = _mm512_loadu_ps(vp.add(r * dim + 16 * (c0 + j)));
                }
                for (a, s) in acc.iter_mut().zip(&scores) {
                    let w = _mm512_set1_ps(s[at]);
                    for j in 0..width {
                        a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(w, v[j]));
                    }
                }
                at += 1;
            }
        }
        for (g, a) in acc.iter().enumerate() {
            for (j, a) in a.iter().enumerate().take(width) {
                _mm512_storeu_ps(out.as_mut_ptr().add(g * dim + 16 * (c0 + j)), *a);
            }
        }
    }
}

/// The AVX2 forms of [`dot4`] and of the value accumulation: multiply, then add (no fused
/// multiply-add, which rounds once instead of twice), lanes summed in order, exactly as the
/// portable loops do.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        assert!(k.iter().all(|k| k.len() == q.len()));
        let n8 = q.len() / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..n8).step_by(8) {
            let x = _mm256_loadu_ps(q.as_ptr().add(c));
            for j in 0..4 {
                let y = _mm256_loadu_ps(k[j].as_ptr().add(c));
                acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(x, y));
            }
        }
        let mut out = [0f32; 4];
        for j in 0..4 {
            let tail: f32 = q[n8..].iter().zip(&k[j][n8..]).map(|(x, y)| x * y).sum();
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j]);
            out[j] = lanes.iter().sum::<f32>() + tail;
        }
        out
    }

    /// `acc += w · v` for 64 columns.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn add_scaled(acc: &mut [f32; 64], w: f32, v: &[f32]) {
        assert!(v.len() >= 64);
        let w = _mm256_set1_ps(w);
        for j in 0..8 {
            let a = _mm256_loadu_ps(acc.as_ptr().add(8 * j));
            let x = _mm256_loadu_ps(v.as_ptr().add(8 * j));
            _mm256_storeu_ps(
                acc.as_mut_ptr().add(8 * j),
                _mm256_add_ps(a, _mm256_mul_ps(w, x)),
            );
        }
    }
}

/// [`dot`] of `q` with four keys, side by side.
#[inline(always)]
fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let mut lanes = [[0f32; 8]; 4];
    let n8 = q.len() / 8 * 8;
    for c in (0..n8).step_by(8) {
        let x: &[f32; 8] = q[c..c + 8].try_into().unwrap();
        for (lane, key) in lanes.iter_mut().zip(&k) {
            let y: &[f32; 8] = key[c..c + 8].try_into().unwrap();
            for i in 0..8 {
                lane[i] += x[i] * y[i];
            }
        }
    }
    std::array::from_fn(|j| {
        let tail: f32 = q[n8..].iter().zip(&k[j][n8..]).map(|(x, y)| x * y).sum();
        lanes[j].iter().sum::<f32>() + tail
    })
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
            // Gemma 3's shape (four query heads on one KV head of 256), and 80 (five vectors).
            (4, 1, 50, 9, 256, Some(20)),
            (6, 2, 30, 30, 80, None),
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
