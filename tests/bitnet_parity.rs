//! BitNet b1.58 (`bitnet`) against transformers, on the tiny random checkpoints made by
//! scripts/make_bitnet_fixtures.py in both layouts transformers reads (packed ternary `BitLinear`,
//! bf16 master weights ternarized online by `AutoBitLinear`): logits from safetensors, and from the
//! TQ1_0/TQ2_0 GGUF `xllm quantize` makes of each, equal transformers' within 1e-3 relative —
//! whole sequence, and prefill followed by decode steps through the KV cache.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::Env;
use xllm::arch::CausalLm;
use xllm::quant::KvProfile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |ours - ref| / max |ref|.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check(what: &str, model: &dyn CausalLm, ids: &[u32], reference: &Tensor) {
    let info = model.info().clone();
    let mut cache = info.new_cache(KvProfile::Default, 256).unwrap();
    let logits = model.forward(ids, &mut cache, false).unwrap();
    assert_eq!(logits.dims(), reference.dims());
    let err = relative_error(&logits, reference);
    eprintln!("{what}: max relative logit error {err:.2e}");
    assert!(err <= 1e-3, "{what}: logits differ by {err} (relative)");

    let mut cache = info.new_cache(KvProfile::Default, 256).unwrap();
    let split = 40;
    let last = model.forward(&ids[..split], &mut cache, true).unwrap();
    let err = relative_error(&last, &reference.narrow(0, split - 1, 1).unwrap());
    assert!(err <= 1e-3, "{what}: prefill last logits differ by {err}");
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = model.forward(&[id], &mut cache, true).unwrap();
        let err = relative_error(&step, &reference.narrow(0, i, 1).unwrap());
        assert!(
            err <= 1e-3,
            "{what}: decode at position {i} differs by {err}"
        );
    }
}

fn gguf_model(path: &Path) -> Box<dyn CausalLm> {
    let file = xllm::model::gguf::GgufFile::open(path).unwrap();
    let options = xllm::arch::BuildOptions {
        device: candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        keep_weight_dtype: false,
        activation_stats: None,
    };
    xllm::arch::build(&xllm::arch::WeightSource::Gguf(&file), &options).unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let (ids, reference) = common::reference_ids_and_logits(&dir);
    let model = common::build_f32_cpu(&dir);
    assert_eq!(model.info().architecture, "bitnet");
    check(
        &format!("{name} (safetensors)"),
        model.as_ref(),
        &ids,
        &reference,
    );

    let env = Env::new("http://127.0.0.1:9");
    for ty in ["TQ2_0", "TQ1_0"] {
        let out = env.dir.path().join(format!("{name}-{ty}.gguf"));
        env.run(&[
            "quantize",
            dir.to_str().unwrap(),
            "--type",
            ty,
            "--output",
            out.to_str().unwrap(),
        ])
        .ok();
        let file = xllm::model::gguf::GgufFile::open(&out).unwrap();
        // Every BitLinear is ternary, with its scale beside it; embeddings and head as stored.
        let q = file.side_tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.ty.name, ty);
        assert!(file.has_tensor("blk.0.attn_q.scale"));
        assert!(file.side_tensor("token_embd.weight").is_none());
        let model = gguf_model(&out);
        check(
            &format!("{name} ({ty} GGUF)"),
            model.as_ref(),
            &ids,
            &reference,
        );
    }
}

#[test]
fn packed_bitnet_matches_transformers_from_safetensors_and_tq_gguf() {
    check_fixture("tiny-bitnet-packed");
}

#[test]
fn bf16_master_bitnet_matches_transformers_from_safetensors_and_tq_gguf() {
    check_fixture("tiny-bitnet-bf16");
}

#[test]
fn ternary_scale_is_refused_for_an_already_ternary_source() {
    let env = Env::new("http://127.0.0.1:9");
    let dir = fixture("tiny-bitnet-packed");
    env.run(&[
        "quantize",
        dir.to_str().unwrap(),
        "--type",
        "TQ2_0",
        "--ternary-scale",
        "absmean-channel",
        "--dry-run",
    ])
    .fails_with(1, "already ternary");
}
