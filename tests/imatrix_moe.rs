//! `xllm imatrix` on the MoE and hybrid fixtures, experts counted per expert:
//!
//! - gpt-oss and Nemotron-H (fixture a) against llama.cpp's own `llama-imatrix` on its own
//!   conversion of the same checkpoint, same text and chunks (tests/fixtures/quantize/
//!   *.llama-imatrix.gguf, made by scripts/make_imatrix_fixtures.py, which says why the gpt-oss
//!   copy has YaRN truncated and its reference f32 experts): the same weight names, every
//!   weight's token count and every expert's equal, sums within 1e-4 relative;
//! - Nemotron-H fixture b (llama.cpp's converter rejects its shape) against transformers: the
//!   first MoE layer's per-expert counts equal the number of tokens transformers' router sent to
//!   each expert, and the sums equal the squares of transformers' MoE input on those tokens
//!   (tests/fixtures/nemotron_h_b/reference.safetensors, scripts/make_nemotron_fixtures.py);
//! - for both architectures, the names are exactly the matmul weights llama.cpp would quantize;
//! - BitNet (both checkpoint layouts) records its seven projections per layer.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use xllm::quantize::imatrix::{Entry, Imatrix};

const TEXT: &str = "tests/fixtures/texts/gpl3-excerpt.txt";
const CTX: usize = 64;
const CHUNKS: usize = 4;

/// The reference file, or `None` (the test is skipped) when it was not made.
fn reference(name: &str) -> Option<Imatrix> {
    let path = format!("tests/fixtures/quantize/{name}.llama-imatrix.gguf");
    if !Path::new(&path).is_file() {
        eprintln!(
            "skipped: {path} missing; run scripts/make_imatrix_fixtures.py with llama.cpp built"
        );
        return None;
    }
    Some(Imatrix::read(Path::new(&path)).unwrap())
}

/// A copy of a fixture folder (the imatrix cache is written next to the model), with
/// `config.json` edited by `edit`.
fn copy_fixture(name: &str, to: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(format!("tests/fixtures/{name}")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let cfg = to.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&cfg, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `xllm imatrix` on `model` with the reference's text, context and chunks.
fn ours(env: &Env, model: &Path) -> Imatrix {
    let out = env.dir.path().join("ours.imatrix.gguf");
    let text = std::fs::canonicalize(TEXT).unwrap();
    let (ctx, chunks) = (CTX.to_string(), CHUNKS.to_string());
    env.run(&[
        "imatrix",
        model.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--ctx",
        &ctx,
        "--chunks",
        &chunks,
        "-o",
        out.to_str().unwrap(),
    ])
    .ok();
    Imatrix::read(&out).unwrap()
}

/// Largest |a − b| of one matrix's sums relative to the largest |b| there.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Same names, counts (per expert) and sums within `tol` of each matrix (per expert).
fn assert_matches(ours: &Imatrix, theirs: &Imatrix, tol: f64) {
    let (a, b): (BTreeSet<_>, BTreeSet<_>) = (
        ours.entries.keys().collect(),
        theirs.entries.keys().collect(),
    );
    assert_eq!(a, b, "weight names differ from llama-imatrix's");
    assert_eq!(
        (ours.chunk_count, ours.chunk_size),
        (theirs.chunk_count, theirs.chunk_size)
    );
    let mut experts = 0;
    for (name, t) in &theirs.entries {
        let o = &ours.entries[name];
        assert_eq!(o.counts, t.counts, "{name}: token counts (per expert)");
        assert_eq!(o.sums.len(), t.sums.len(), "{name}: sums");
        let cols = t.sums.len() / t.counts.len();
        for m in 0..t.counts.len() {
            let r = relative(
                &o.sums[m * cols..(m + 1) * cols],
                &t.sums[m * cols..(m + 1) * cols],
            );
            assert!(
                r <= tol,
                "{name} matrix {m}: sums differ by {r:.2e} relative"
            );
        }
        if t.counts.len() > 1 {
            experts += 1;
        }
    }
    assert!(experts > 0, "no expert tensors compared");
}

/// Every expert tensor: one count per expert, adding up to `top_k` per token, the same for the
/// tensors that share an input; not all experts got the same tokens (the test would not see a
/// mix-up otherwise).
fn assert_expert_counts(m: &Imatrix, experts: usize, top_k: usize) {
    let tokens = (CTX * CHUNKS) as f32;
    for (name, e) in &m.entries {
        if !name.contains("_exps") {
            assert_eq!(e.counts, vec![tokens], "{name}");
            continue;
        }
        assert_eq!(e.counts.len(), experts, "{name}");
        assert_eq!(
            e.counts.iter().sum::<f32>(),
            tokens * top_k as f32,
            "{name}"
        );
        let distinct: BTreeSet<u32> = e.counts.iter().map(|&c| c as u32).collect();
        assert!(distinct.len() > 1, "{name}: {:?}", e.counts);
        let layer = name.split('.').nth(1).unwrap();
        let down = &m.entries[&format!("blk.{layer}.ffn_down_exps.weight")];
        assert_eq!(e.counts, down.counts, "{name} vs ffn_down_exps");
    }
}

/// The GGUF names of the matmul weights llama.cpp quantizes in a Nemotron-H of `pattern`
/// (`*` attention, `M` Mamba2, `-` MLP, `E` MoE); the router is collected as llama-imatrix does.
fn nemotron_names(pattern: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (l, c) in pattern.chars().enumerate() {
        let parts: &[&str] = match c {
            '*' => &["attn_q", "attn_k", "attn_v", "attn_output"],
            'M' => &["ssm_in", "ssm_out"],
            '-' => &["ffn_up", "ffn_down"],
            'E' => &[
                "ffn_gate_inp",
                "ffn_up_exps",
                "ffn_down_exps",
                "ffn_up_shexp",
                "ffn_down_shexp",
            ],
            _ => panic!("pattern letter {c}"),
        };
        out.extend(parts.iter().map(|p| format!("blk.{l}.{p}.weight")));
    }
    out
}

#[test]
fn gpt_oss_matches_llama_imatrix_per_expert() {
    let Some(theirs) = reference("gpt_oss_tiny") else {
        return;
    };
    let env = Env::new("http://127.0.0.1:9");
    let model = env.dir.path().join("gpt_oss_tiny");
    // llama.cpp rounds YaRN's correction range whatever the config says (see the script).
    copy_fixture("gpt_oss_tiny", &model, |v| {
        v["rope_scaling"]["truncate"] = true.into()
    });
    let ours = ours(&env, &model);
    assert_matches(&ours, &theirs, 1e-4);
    assert_expert_counts(&ours, 8, 4);
    let mut want = BTreeSet::new();
    for l in 0..4 {
        for p in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate_inp",
            "ffn_gate_exps",
            "ffn_up_exps",
            "ffn_down_exps",
        ] {
            want.insert(format!("blk.{l}.{p}.weight"));
        }
    }
    assert_eq!(ours.entries.keys().cloned().collect::<BTreeSet<_>>(), want);
    let e = &ours.entries["blk.0.ffn_gate_exps.weight"];
    assert_eq!(e.sums.len(), 64 * 8, "64 columns per expert");

    // `xllm quantize --imatrix` takes it: the weighted attention differs from the unweighted
    // one, the MXFP4 experts are kept as they are.
    let imatrix = env.dir.path().join("ours.imatrix.gguf");
    let quantize = |out: &Path, with: bool| {
        let mut args = vec![
            "quantize",
            model.to_str().unwrap(),
            "--type",
            "Q4_0",
            "-o",
            out.to_str().unwrap(),
        ];
        if with {
            args.extend(["--imatrix", imatrix.to_str().unwrap()]);
        }
        env.run(&args).ok();
        xllm::quantize::gguf::GgufReader::open(out).unwrap()
    };
    let (a, b) = (
        quantize(&env.dir.path().join("w.gguf"), true),
        quantize(&env.dir.path().join("p.gguf"), false),
    );
    let bytes = |r: &xllm::quantize::gguf::GgufReader, name: &str| {
        let t = r.tensors.iter().find(|t| t.name == name).unwrap();
        (t.ty.name(), r.data(t).to_vec())
    };
    let (wq, pq) = (
        bytes(&a, "blk.0.attn_q.weight"),
        bytes(&b, "blk.0.attn_q.weight"),
    );
    assert_eq!(wq.0, "Q4_0");
    assert_ne!(wq.1, pq.1, "the importance changed nothing in attn_q");
    let (we, pe) = (
        bytes(&a, "blk.0.ffn_down_exps.weight"),
        bytes(&b, "blk.0.ffn_down_exps.weight"),
    );
    assert_eq!(we.0, "MXFP4");
    assert_eq!(we, pe);
}

#[test]
fn nemotron_h_matches_llama_imatrix_per_expert() {
    let Some(theirs) = reference("nemotron_h_a") else {
        return;
    };
    let env = Env::new("http://127.0.0.1:9");
    let model = env.dir.path().join("nemotron_h_a");
    copy_fixture("nemotron_h_a", &model, |_| {});
    let ours = ours(&env, &model);
    assert_matches(&ours, &theirs, 1e-4);
    assert_expert_counts(&ours, 12, 4);
    assert_eq!(
        ours.entries.keys().cloned().collect::<BTreeSet<_>>(),
        nemotron_names("MEM*EMEM*E")
    );
}

/// Σ over `rows` of `x[row]²`, per column.
fn squares(x: &[Vec<f32>], rows: impl Iterator<Item = usize>) -> Vec<f64> {
    let mut s = vec![0f64; x[0].len()];
    for r in rows {
        for (a, &v) in s.iter_mut().zip(&x[r]) {
            *a += (v as f64) * (v as f64);
        }
    }
    s
}

fn assert_close(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((*g as f64) - w).abs() <= 1e-4 * scale,
            "{name} column {j}: {g} vs {w}"
        );
    }
}

#[test]
fn nemotron_h_expert_counts_follow_transformers_routing() {
    use candle_core::{DType, Device};
    use xllm::arch::{BuildOptions, WeightSource};
    use xllm::kernels::act_stats::ActivationStats;

    let dir = Path::new("tests/fixtures/nemotron_h_b");
    let refj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let layer = refj["kernels"]["moe_layer"].as_u64().unwrap() as usize;
    let n = refj["kernels"]["tokens"].as_u64().unwrap() as usize;
    let ids: Vec<u32> = refj["text_ids"].as_array().unwrap()[..n]
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let experts = config["n_routed_experts"].as_u64().unwrap() as usize;
    let pattern = config["hybrid_override_pattern"].as_str().unwrap();

    let stats = ActivationStats::new();
    let weights = xllm::model::safetensors::SafetensorsWeights::open_dir(dir).unwrap();
    let options = BuildOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        keep_weight_dtype: false,
        activation_stats: Some(stats.clone()),
    };
    let model = xllm::arch::build(
        &WeightSource::Safetensors {
            config: &config,
            weights: &weights,
        },
        &options,
    )
    .unwrap();
    let mut cache = model
        .info()
        .new_cache(xllm::quant::KvProfile::Default, n)
        .unwrap();
    model.forward(&ids, &mut cache, true).unwrap();
    let got = stats.snapshot();
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        nemotron_names(pattern)
    );

    let reference = xllm::model::safetensors::SafetensorsWeights::open_files(&[
        dir.join("reference.safetensors")
    ])
    .unwrap();
    let moe_in: Vec<Vec<f32>> = reference
        .load("kernel.moe_in", DType::F32, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    let chosen: Vec<Vec<i64>> = reference
        .load("kernel.topk_indices", DType::I64, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    let entry = |w: &str| {
        let s = &got[&format!("blk.{layer}.{w}.weight")];
        Entry {
            sums: s.sums.iter().map(|&v| v as f32).collect(),
            counts: s.counts.iter().map(|&c| c as f32).collect(),
        }
    };
    // Dense weights of the MoE block see every token's input.
    let all = squares(&moe_in, 0..n);
    for w in ["ffn_gate_inp", "ffn_up_shexp"] {
        let e = entry(w);
        assert_eq!(e.counts, vec![n as f32], "{w}");
        assert_close(w, &e.sums, &all);
    }
    // Each expert sees only the tokens transformers' router sent to it.
    let up = entry("ffn_up_exps");
    let cols = moe_in[0].len();
    assert_eq!(up.counts.len(), experts);
    let mut used = 0;
    for x in 0..experts {
        let rows: Vec<usize> = (0..n)
            .filter(|&t| chosen[t].contains(&(x as i64)))
            .collect();
        assert_eq!(up.counts[x], rows.len() as f32, "expert {x}: tokens routed");
        let want = squares(&moe_in, rows.iter().copied());
        assert_close(
            &format!("ffn_up_exps expert {x}"),
            &up.sums[x * cols..(x + 1) * cols],
            &want,
        );
        used += usize::from(!rows.is_empty());
    }
    assert!(used > 1, "the router used {used} experts");
    assert_eq!(entry("ffn_down_exps").counts, up.counts);
}

#[test]
fn bitnet_records_every_projection() {
    for fixture in ["tiny-bitnet-bf16", "tiny-bitnet-packed"] {
        let env = Env::new("http://127.0.0.1:9");
        let model = env.dir.path().join(fixture);
        copy_fixture(fixture, &model, |_| {});
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        let m = ours(&env, &model);
        let mut want = BTreeSet::new();
        for l in 0..layers {
            for p in [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                want.insert(format!("blk.{l}.{p}.weight"));
            }
        }
        assert_eq!(
            m.entries.keys().cloned().collect::<BTreeSet<_>>(),
            want,
            "{fixture}"
        );
        for (name, e) in &m.entries {
            assert_eq!(e.counts, vec![(CTX * CHUNKS) as f32], "{fixture} {name}");
            assert!(
                e.sums.iter().all(|v| *v > 0.0 && v.is_finite()),
                "{fixture} {name}"
            );
        }
        // q, k and v share one input.
        assert_eq!(
            m.entries["blk.0.attn_q.weight"],
            m.entries["blk.0.attn_v.weight"]
        );
    }
}
