//! Cost of one decode step's attention with each KV profile, as a ratio to the unquantized
//! cache in the same run: append one token to a cache holding `ctx` tokens, then attend over
//! it (grouped-query attention, SmolLM2-135M's shape per layer: 9 query heads, 3 KV heads,
//! head_dim 64). Run with `cargo bench --bench kv_cache`; `KV_BENCH_CTX` picks the context
//! (default 4096), `KV_BENCH_STEPS` the decode steps timed (default 64).

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use xllm::quant::KvProfile;
use xllm::state::kv_cache::{new_store, KvLayout, KvStore};

const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One decode step: append `k`, `v` and attend from `q` over the whole cache. Returns the
/// attention output and the time spent in `append` (write + handing back the cache).
fn step(
    store: &mut dyn KvStore,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<(Tensor, Duration)> {
    let start = Instant::now();
    let (keys, values) = store.append(k, v)?;
    let append = start.elapsed();
    let group = Q_HEADS / KV_HEADS;
    let q = q.reshape((1, KV_HEADS, group, HEAD_DIM))?;
    let scores = (q.matmul(&keys.t()?.contiguous()?)? / (HEAD_DIM as f64).sqrt())?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs
        .matmul(&values.contiguous()?)?
        .reshape((1, Q_HEADS, 1, HEAD_DIM))?;
    Ok((out, append))
}

fn main() -> candle_core::Result<()> {
    let ctx = env_usize("KV_BENCH_CTX", 4096);
    let steps = env_usize("KV_BENCH_STEPS", 64);
    let device = Device::Cpu;
    let dtype = DType::F32;
    let layout = KvLayout {
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        max_tokens: ctx + steps + 1,
    };
    let prompt = Tensor::randn(0f32, 1.0, (1, KV_HEADS, ctx, HEAD_DIM), &device)?;
    let q = Tensor::randn(0f32, 1.0, (1, Q_HEADS, 1, HEAD_DIM), &device)?;
    let token = Tensor::randn(0f32, 1.0, (1, KV_HEADS, 1, HEAD_DIM), &device)?;

    println!(
        "decode-step attention, one layer, ctx {ctx}, {steps} steps, {dtype:?} compute on CPU"
    );
    let mut baseline: Option<Duration> = None;
    for profile in [KvProfile::Default, KvProfile::KvInt8, KvProfile::KvFp8] {
        let mut store = new_store(profile, layout, dtype, &device)?;
        store.append(&prompt, &prompt)?;
        step(store.as_mut(), &q, &token, &token)?; // warm-up
        let start = Instant::now();
        let mut append = Duration::ZERO;
        for _ in 0..steps {
            append += step(store.as_mut(), &q, &token, &token)?.1;
        }
        let per_step = start.elapsed() / steps as u32;
        let append = append / steps as u32;
        let ratio = baseline.map_or(1.0, |b| per_step.as_secs_f64() / b.as_secs_f64());
        baseline.get_or_insert(per_step);
        println!(
            "{:<8} {:>9.1} µs/step ({:>8.1} µs in append)  {:>5.2}x default  {:>9} KV bytes",
            profile.token(),
            per_step.as_secs_f64() * 1e6,
            append.as_secs_f64() * 1e6,
            ratio,
            store.allocated_bytes()
        );
    }
    Ok(())
}
