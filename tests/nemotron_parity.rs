//! Nemotron-H against transformers on the tiny fixtures (scripts/make_nemotron_fixtures.py):
//! logits at every position for one-shot prefill, prefill + decode and chunked prefill,
//! perplexity, 32 greedy tokens, sequences mixed in one batch, and the Mamba2/MoE kernels piece by
//! piece against the values transformers' modules produced.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;
use xllm::arch::nemotron_h::NemotronH;
use xllm::arch::{BatchSeq, BuildOptions, CausalLm, Logits};
use xllm::kernels::moe::{route_sigmoid_biased, SigmoidRouter};
use xllm::kernels::ssm::{CausalConv1d, GatedGroupNorm, ScanInput, SsmScan};
use xllm::model::safetensors::SafetensorsWeights;
use xllm::quant::KvProfile;
use xllm::state::{LayerState, SequenceState};

const FIXTURES: [&str; 2] = ["nemotron_h_a", "nemotron_h_b"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir(name).join("reference.json")).unwrap())
        .unwrap()
}

fn reference_tensors(name: &str) -> SafetensorsWeights {
    SafetensorsWeights::open_files(&[dir(name).join("reference.safetensors")]).unwrap()
}

fn rows_of(w: &SafetensorsWeights, tensor: &str) -> Vec<Vec<f32>> {
    w.load(tensor, DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn load_with(name: &str, keep_weight_dtype: bool) -> NemotronH {
    let d = dir(name);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let weights = SafetensorsWeights::open_dir(&d).unwrap();
    let options = BuildOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        keep_weight_dtype,
        activation_stats: None,
    };
    NemotronH::from_weights(&config, &weights, &options).unwrap()
}

fn load(name: &str) -> NemotronH {
    load_with(name, false)
}

fn new_cache(model: &NemotronH) -> SequenceState {
    model.info().new_cache(KvProfile::Default, 4096).unwrap()
}

/// `max |a − b| / max |b|` of one logits row.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    d / m.max(1e-6)
}

fn assert_rows_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    let mut worst = (0usize, 0f32);
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        let r = rel_diff(g, w);
        if r > worst.1 {
            worst = (p, r);
        }
    }
    eprintln!(
        "{what}: worst relative difference {:.2e} at position {}",
        worst.1, worst.0
    );
    assert!(
        worst.1 < tol,
        "{what}: position {} differs by {:.3e} (relative)",
        worst.0,
        worst.1
    );
}

fn mean_nll(rows: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let mut total = 0f64;
    for (row, &next) in rows.iter().zip(&tokens[1..]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        total += lse - row[next as usize] as f64;
    }
    total / (tokens.len() - 1) as f64
}

/// Runs `pieces` of `tokens` one after another on a fresh sequence; all logits rows.
fn run_pieces(model: &NemotronH, tokens: &[u32], pieces: &[usize]) -> Vec<Vec<f32>> {
    let mut cache = new_cache(model);
    let mut rows = Vec::new();
    let mut at = 0;
    for &size in pieces {
        let l = model
            .forward(&tokens[at..at + size], &mut cache, false)
            .unwrap();
        rows.extend(l.to_vec2::<f32>().unwrap());
        at += size;
    }
    assert_eq!(at, tokens.len());
    assert_eq!(cache.position(), at);
    rows
}

#[test]
fn prefill_logits_and_perplexity_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let r = reference(name);
        let tokens = ids(&r["text_ids"]);
        let rows = run_pieces(&model, &tokens, &[tokens.len()]);
        let want = rows_of(&reference_tensors(name), "prefill_logits");
        assert_rows_close(&format!("{name} prefill"), &rows, &want, 1e-3);
        let ppl = mean_nll(&rows[..tokens.len() - 1], &tokens).exp();
        let want_ppl = r["perplexity"].as_f64().unwrap();
        let rel = (ppl - want_ppl).abs() / want_ppl;
        eprintln!(
            "{name}: perplexity ours {ppl:.6}, transformers {want_ppl:.6}, relative {rel:.2e}"
        );
        assert!(rel < 1e-4, "{name}: perplexity {ppl} vs {want_ppl}");
    }
}

#[test]
fn prefill_then_decode_matches_transformers_cache() {
    for name in FIXTURES {
        let model = load(name);
        let r = reference(name);
        let tokens = ids(&r["text_ids"]);
        let from = r["decode_from"].as_u64().unwrap() as usize;
        let mut pieces = vec![from];
        pieces.extend(std::iter::repeat_n(1, tokens.len() - from));
        let rows = run_pieces(&model, &tokens, &pieces);
        let want = rows_of(&reference_tensors(name), "decode_logits");
        assert_rows_close(&format!("{name} prefill+decode"), &rows, &want, 1e-3);
    }
}

#[test]
fn chunked_prefill_matches_transformers() {
    for name in FIXTURES {
        let model = load(name);
        let tokens = ids(&reference(name)["text_ids"]);
        // Uneven pieces: shorter and longer than the fixtures' scan chunks (16 and 8 tokens),
        // single tokens in between, and the rest at once.
        let mut pieces = vec![5, 17, 1, 30, 3, 9, 1, 1, 40];
        let used: usize = pieces.iter().sum();
        pieces.push(tokens.len() - used);
        let rows = run_pieces(&model, &tokens, &pieces);
        let r = reference(name);
        assert_eq!(
            ids(&r["chunked_pieces"]),
            pieces.iter().map(|&p| p as u32).collect::<Vec<_>>()
        );
        // transformers fed the same pieces through its cache, and its one-shot prefill.
        let refs = reference_tensors(name);
        assert_rows_close(
            &format!("{name} chunked prefill vs transformers chunked"),
            &rows,
            &rows_of(&refs, "chunked_logits"),
            1e-3,
        );
        assert_rows_close(
            &format!("{name} chunked prefill vs one-shot"),
            &rows,
            &rows_of(&refs, "prefill_logits"),
            1e-3,
        );
    }
}

#[test]
fn bf16_weights_kept_as_stored_give_the_same_logits() {
    let name = FIXTURES[0];
    let model = load_with(name, true);
    let tokens = ids(&reference(name)["text_ids"]);
    let rows = run_pieces(&model, &tokens, &[60, 1, 1, tokens.len() - 62]);
    let want = rows_of(&reference_tensors(name), "prefill_logits");
    assert_rows_close(&format!("{name} bf16 kernels"), &rows, &want, 1e-3);
}

#[test]
fn greedy_32_tokens_match_transformers() {
    for name in FIXTURES {
        let model = load(name);
        for case in reference(name)["greedy"].as_array().unwrap() {
            let prompt = ids(&case["prompt"]);
            let want = ids(&case["continuation"]);
            let mut cache = new_cache(&model);
            let mut logits = model.forward(&prompt, &mut cache, true).unwrap();
            let mut got = Vec::new();
            for _ in 0..want.len() {
                let next = logits
                    .i(0)
                    .unwrap()
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap();
                got.push(next);
                logits = model.forward(&[next], &mut cache, true).unwrap();
            }
            assert_eq!(
                got,
                want,
                "{name}, prompt of {} tokens; margins {}",
                prompt.len(),
                case["margins"]
            );
        }
    }
}

#[test]
fn sequences_at_different_positions_in_one_batch() {
    for name in FIXTURES {
        let model = load(name);
        let tokens = ids(&reference(name)["text_ids"]);
        let want = rows_of(&reference_tensors(name), "prefill_logits");
        // Three sequences over the same text, already at positions 0, 20 and 50; one batch step
        // feeds a prompt chunk to the first, one decode token to the second, 7 tokens to the third.
        let starts = [0usize, 20, 50];
        let feeds = [12usize, 1, 7];
        let mut caches: Vec<SequenceState> = starts.iter().map(|_| new_cache(&model)).collect();
        for (&s, cache) in starts.iter().zip(&mut caches) {
            if s > 0 {
                model.forward(&tokens[..s], cache, true).unwrap();
            }
        }
        let mut want_rows = Vec::new();
        for (&s, &f) in starts.iter().zip(&feeds) {
            want_rows.extend(want[s..s + f].iter().cloned());
        }
        let mut batch: Vec<BatchSeq<'_>> = starts
            .iter()
            .zip(&feeds)
            .zip(caches.iter_mut())
            .map(|((&s, &f), cache)| BatchSeq {
                tokens: &tokens[s..s + f],
                state: cache,
                logits: Logits::All,
            })
            .collect();
        let logits = model.forward_batch(&mut batch).unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        assert_rows_close(&format!("{name} mixed batch"), &rows, &want_rows, 1e-3);
        // Each state moved on by its own tokens only.
        for ((&s, &f), cache) in starts.iter().zip(&feeds).zip(&caches) {
            assert_eq!(cache.position(), s + f);
        }
    }
}

/// The fixture checkpoint's tensor `name` as f32 values.
fn weight(ckpt: &SafetensorsWeights, name: &str) -> Vec<f32> {
    ckpt.load(name, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn flat(w: &SafetensorsWeights, name: &str) -> Vec<f32> {
    weight(w, name)
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    rel_diff(got, want)
}

#[test]
fn mamba_kernels_match_transformers_modules() {
    for name in FIXTURES {
        let r = reference(name);
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir(name).join("config.json")).unwrap())
                .unwrap();
        let cfg = xllm::arch::nemotron_h::NemotronHConfig::from_value(&config).unwrap();
        let ckpt = SafetensorsWeights::open_dir(&dir(name)).unwrap();
        let refs = reference_tensors(name);
        let layer = r["kernels"]["mamba_layer"].as_u64().unwrap();
        let t = r["kernels"]["tokens"].as_u64().unwrap() as usize;
        let m = format!("backbone.layers.{layer}.mixer");
        let (di, cd, nh, width) = (
            cfg.d_inner(),
            cfg.conv_dim(),
            cfg.mamba_heads,
            cfg.in_proj_dim(),
        );
        let proj = flat(&refs, "kernel.in_proj_out");
        assert_eq!(proj.len(), t * width);

        // conv1d + SiLU over xBC, in two pieces (the conv state carries over).
        let conv = CausalConv1d::new(
            &weight(&ckpt, &format!("{m}.conv1d.weight")),
            Some(&weight(&ckpt, &format!("{m}.conv1d.bias"))),
            cd,
            cfg.conv_kernel,
        )
        .unwrap();
        let mut state = vec![0f32; conv.state_len()];
        let mut xbc = vec![0f32; t * cd];
        let split = 13;
        conv.forward(
            &proj[di..],
            width,
            split,
            &mut state,
            &mut xbc[..split * cd],
        )
        .unwrap();
        conv.forward(
            &proj[split * width + di..],
            width,
            t - split,
            &mut state,
            &mut xbc[split * cd..],
        )
        .unwrap();
        let want_conv = flat(&refs, "kernel.conv_out");
        let d = max_rel(&xbc, &want_conv);
        assert!(d < 1e-5, "{name}: conv differs by {d}");

        // The scan from transformers' conv output: chunked, recurrent, and chunked + recurrent.
        let a_log = weight(&ckpt, &format!("{m}.A_log"));
        let scan = SsmScan {
            heads: nh,
            head_dim: cfg.mamba_head_dim,
            groups: cfg.n_groups,
            state: cfg.ssm_state,
            a: a_log.iter().map(|v| -v.exp()).collect(),
            d: weight(&ckpt, &format!("{m}.D")),
            dt_bias: weight(&ckpt, &format!("{m}.dt_bias")),
            dt_min: cfg.time_step_min as f32,
            chunk: cfg.chunk_size,
        };
        let dt: Vec<f32> = proj
            .chunks_exact(width)
            .flat_map(|row| row[di + cd..].iter().copied())
            .collect();
        let want_scan = flat(&refs, "kernel.scan_out");
        let input = ScanInput {
            xbc: &want_conv,
            stride: cd,
            dt: &dt,
            tokens: t,
        };
        for how in ["chunked", "recurrent", "mixed"] {
            let mut s = vec![0f32; scan.state_len()];
            let mut y = vec![0f32; t * di];
            match how {
                "chunked" => scan.chunked(input, &mut s, &mut y).unwrap(),
                "recurrent" => scan.recurrent(input, &mut s, &mut y).unwrap(),
                _ => {
                    let k = 21;
                    let first = ScanInput {
                        tokens: k,
                        dt: &dt[..k * nh],
                        ..input
                    };
                    scan.chunked(first, &mut s, &mut y[..k * di]).unwrap();
                    let rest = ScanInput {
                        xbc: &want_conv[k * cd..],
                        dt: &dt[k * nh..],
                        tokens: t - k,
                        stride: cd,
                    };
                    scan.recurrent(rest, &mut s, &mut y[k * di..]).unwrap();
                }
            }
            let d = max_rel(&y, &want_scan);
            assert!(d < 1e-4, "{name}: {how} scan differs by {d}");
        }

        // Grouped gated RMSNorm with z from in_proj.
        let norm = GatedGroupNorm {
            weight: weight(&ckpt, &format!("{m}.norm.weight")),
            group_size: di / cfg.n_groups,
            eps: cfg.eps as f32,
        };
        let mut out = vec![0f32; t * di];
        norm.forward(&want_scan, &proj, width, &mut out).unwrap();
        let d = max_rel(&out, &flat(&refs, "kernel.norm_out"));
        assert!(d < 1e-5, "{name}: gated norm differs by {d}");
    }
}

#[test]
fn moe_routing_matches_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir(name).join("config.json")).unwrap())
                .unwrap();
        let cfg = xllm::arch::nemotron_h::NemotronHConfig::from_value(&config).unwrap();
        let ckpt = SafetensorsWeights::open_dir(&dir(name)).unwrap();
        let refs = reference_tensors(name);
        let layer = r["kernels"]["moe_layer"].as_u64().unwrap();
        let t = r["kernels"]["tokens"].as_u64().unwrap() as usize;
        let m = format!("backbone.layers.{layer}.mixer");
        let logits = flat(&refs, "kernel.router_logits");
        // Our f32 router logits from the MoE input agree with transformers'.
        let x = refs
            .load("kernel.moe_in", DType::F32, &Device::Cpu)
            .unwrap();
        let w = ckpt
            .load(&format!("{m}.gate.weight"), DType::F32, &Device::Cpu)
            .unwrap();
        let ours: Vec<f32> = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_rel(&ours, &logits) < 1e-5);
        let router = SigmoidRouter {
            top_k: cfg.top_k,
            correction_bias: weight(&ckpt, &format!("{m}.gate.e_score_correction_bias")),
            normalize: cfg.norm_topk_prob,
            scale: cfg.routed_scaling_factor as f32,
        };
        let routing = route_sigmoid_biased(&logits, t, &router).unwrap();
        let want_idx = refs
            .load("kernel.topk_indices", DType::I64, &Device::Cpu)
            .unwrap();
        let want_idx: Vec<i64> = want_idx.flatten_all().unwrap().to_vec1().unwrap();
        let want_w = flat(&refs, "kernel.topk_weights");
        for tok in 0..t {
            let k = cfg.top_k;
            let mut pairs: Vec<(u32, f32)> = (0..k)
                .map(|j| (routing.indices[tok * k + j], routing.weights[tok * k + j]))
                .collect();
            pairs.sort_by_key(|p| p.0);
            for (j, (e, wt)) in pairs.iter().enumerate() {
                assert_eq!(
                    *e as i64,
                    want_idx[tok * k + j],
                    "{name}: token {tok} experts"
                );
                assert!(
                    (wt - want_w[tok * k + j]).abs() < 1e-5,
                    "{name}: token {tok} weight"
                );
            }
        }
        // The whole MoE layer (routed + shared) through the model's block equals transformers'.
        let model = load(name);
        let got = model.moe_mixer(layer as usize, &x).unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let d = max_rel(&got, &flat(&refs, "kernel.moe_out"));
        assert!(d < 1e-5, "{name}: MoE layer differs by {d}");
    }
}

#[test]
fn registry_builds_nemotron_h() {
    let model = common::build_f32_cpu(&dir(FIXTURES[1]));
    assert_eq!(model.info().architecture, "nemotron_h");
    assert_eq!(model.info().cache_layers, 2);
    let tokens = &ids(&reference(FIXTURES[1])["text_ids"])[..30];
    let mut cache = model.info().new_cache(KvProfile::Default, 64).unwrap();
    let a: Vec<f32> = model
        .forward(tokens, &mut cache, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = rows_of(&reference_tensors(FIXTURES[1]), "prefill_logits");
    assert!(rel_diff(&a, &want[29]) < 1e-3);
    let err = model
        .forward(&[100_000], &mut cache, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
}

#[test]
fn a_rewound_state_goes_back_to_the_start() {
    // A chat turn that reuses only part of the previous prompt truncates the state; the Mamba
    // state cannot be cut, so the state goes back to the start and says so: the caller re-reads.
    let name = FIXTURES[0];
    let model = common::build_f32_cpu(&dir(name));
    let tokens = ids(&reference(name)["text_ids"]);
    let want = rows_of(&reference_tensors(name), "prefill_logits");
    let mut cache = model.info().new_cache(KvProfile::Default, 4096).unwrap();
    model.forward(&tokens[..50], &mut cache, true).unwrap();
    let kept = cache.truncate(30);
    assert_eq!(
        kept, 0,
        "a recurrent state cannot keep part of what it read"
    );
    assert_eq!(cache.position(), 0);
    assert!(
        !cache.shareable(),
        "a hybrid state is never shared as a prefix"
    );
    let rows: Vec<Vec<f32>> = model
        .forward(&tokens[kept..60], &mut cache, false)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_rows_close("rewound to 30", &rows[30..], &want[30..60], 1e-3);
    // Back to the start: a fresh sequence.
    cache.clear();
    let first: Vec<f32> = model
        .forward(&tokens[..3], &mut cache, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(rel_diff(&first, &want[2]) < 1e-3);
}

#[test]
fn kv_profiles_apply_to_the_attention_layers() {
    let name = FIXTURES[0];
    let model = load(name);
    let tokens = ids(&reference(name)["text_ids"]);
    let want = rows_of(&reference_tensors(name), "prefill_logits");
    let nll_ref = mean_nll(&want[..tokens.len() - 1], &tokens);
    for profile in [KvProfile::KvInt8, KvProfile::KvFp8] {
        let mut cache = model.info().new_cache(profile, 4096).unwrap();
        let mut rows: Vec<Vec<f32>> = model
            .forward(&tokens[..50], &mut cache, false)
            .unwrap()
            .to_vec2()
            .unwrap();
        for t in 50..tokens.len() {
            let l = model.forward(&tokens[t..t + 1], &mut cache, false).unwrap();
            rows.extend(l.to_vec2::<f32>().unwrap());
        }
        let nll = mean_nll(&rows[..tokens.len() - 1], &tokens);
        eprintln!("{profile:?}: mean NLL {nll:.4} vs {nll_ref:.4}");
        assert!(
            (nll - nll_ref).abs() < 0.1,
            "{profile:?}: NLL {nll} vs {nll_ref}"
        );
        let kv = cache
            .layers
            .iter()
            .filter(|l| matches!(l, LayerState::Kv(_)))
            .count();
        assert_eq!(kv, 2, "KV only for the two attention layers");
    }
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
