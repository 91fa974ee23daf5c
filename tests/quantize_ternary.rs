//! `xllm quantize --type TQ1_0|TQ2_0 --ternary-scale absmax|absmean-channel` and
//! `--dry-run --stats`, checked against the two scale rules written out independently here:
//! llama.cpp's block absmax (`d = max |w|` per 256 values, `round(w / d)`, half away from zero)
//! and BitNet b1.58's absmean per output row (`d = mean |w|` of the row, `w / d` rounded half to
//! even and clipped to ±1). Both store `d` as f16; the reconstruction is `level · f16(d)`.

mod common;

use std::path::Path;

use common::Env;
use half::f16;
use xllm::quantize::gguf::{GgufWriter, Metadata, OutTensor, Value};
use xllm::quantize::GgmlType;

const HIDDEN: u64 = 256;
const FF: u64 = 512;

/// Gaussian-like weights (a fixed generator), as trained matrices are: ternary scales differ most
/// there.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * 0.02) as f32
        })
        .collect()
}

fn tensors() -> Vec<(String, Vec<u64>)> {
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![HIDDEN, 300]),
        ("output_norm.weight".to_string(), vec![HIDDEN]),
        ("output.weight".to_string(), vec![HIDDEN, 300]),
    ];
    for (n, ne) in [
        ("attn_norm.weight", vec![HIDDEN]),
        ("attn_q.weight", vec![HIDDEN, HIDDEN]),
        ("attn_k.weight", vec![HIDDEN, HIDDEN / 2]),
        ("attn_v.weight", vec![HIDDEN, HIDDEN / 2]),
        ("attn_output.weight", vec![HIDDEN, HIDDEN]),
        ("ffn_norm.weight", vec![HIDDEN]),
        ("ffn_gate.weight", vec![HIDDEN, FF]),
        ("ffn_up.weight", vec![HIDDEN, FF]),
        ("ffn_down.weight", vec![FF, HIDDEN]),
    ] {
        t.push((format!("blk.0.{n}"), ne));
    }
    t
}

fn tensor_values(name: &str, ne: &[u64]) -> Vec<f32> {
    let seed = name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31) + b as u64);
    values(seed, ne.iter().product::<u64>() as usize)
}

fn write_source(path: &Path) {
    let mut md = Metadata::default();
    md.set("general.architecture", Value::Str("llama".into()));
    md.set("llama.block_count", Value::U32(1));
    md.set("llama.context_length", Value::U32(256));
    md.set("llama.embedding_length", Value::U32(HIDDEN as u32));
    md.set("llama.feed_forward_length", Value::U32(FF as u32));
    md.set("llama.attention.head_count", Value::U32(4));
    md.set("llama.attention.head_count_kv", Value::U32(2));
    md.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    let outs: Vec<OutTensor> = tensors()
        .iter()
        .map(|(n, ne)| OutTensor {
            name: n.clone(),
            ne: ne.clone(),
            ty: GgmlType::F32,
            size: ne.iter().product::<u64>() * 4,
        })
        .collect();
    let mut w = GgufWriter::create(path, &md, &outs, 32, false).unwrap();
    for (n, ne) in tensors() {
        let bytes: Vec<u8> = tensor_values(&n, &ne)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// llama.cpp's block absmax ternary reconstruction.
fn absmax(w: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for b in w.chunks(256) {
        let d = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(b.iter().map(|v| (v * id).round() * f16_round(d)));
    }
    out
}

/// BitNet's absmean rule per row.
fn absmean_channel(w: &[f32], row: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for r in w.chunks(row) {
        let mean = (r.iter().map(|v| v.abs() as f64).sum::<f64>() / row as f64) as f32;
        let d = f16_round(mean);
        out.extend(
            r.iter()
                .map(|v| (v / d).round_ties_even().clamp(-1.0, 1.0) * d),
        );
    }
    out
}

fn relative_error(w: &[f32], y: &[f32]) -> f64 {
    let e: f64 = w.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let n: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
    (e / n).sqrt()
}

#[test]
fn stats_report_both_ternary_scales_and_absmean_channel_writes_row_scales() {
    let env = Env::new("http://127.0.0.1:9");
    let src = env.dir.path().join("src.gguf");
    write_source(&src);
    let stats = env
        .run(&[
            "quantize",
            src.to_str().unwrap(),
            "--type",
            "TQ2_0",
            "--dry-run",
            "--stats",
            "--json",
        ])
        .ok();
    // Two JSON documents: the plan, then the statistics.
    let text = stats.stdout;
    let at = text
        .find("{\n  \"reconstruction\"")
        .expect("stats document");
    let doc: serde_json::Value = serde_json::from_str(&text[at..]).unwrap();
    let rows = doc["reconstruction"].as_array().unwrap();
    let mut ternary = 0;
    for (name, ne) in tensors() {
        let Some(row) = rows.iter().find(|r| r["name"] == name.as_str()) else {
            continue;
        };
        if row["type"] != "TQ2_0" {
            continue;
        }
        ternary += 1;
        let w = tensor_values(&name, &ne);
        let got_max = row["relative_rms_error"]["absmax"].as_f64().unwrap();
        let got_mean = row["relative_rms_error"]["absmean-channel"]
            .as_f64()
            .unwrap();
        let want_max = relative_error(&w, &absmax(&w));
        let want_mean = relative_error(&w, &absmean_channel(&w, ne[0] as usize));
        assert!(
            (got_max - want_max).abs() < 1e-6,
            "{name}: absmax {got_max} vs {want_max}"
        );
        assert!(
            (got_mean - want_mean).abs() < 1e-6,
            "{name}: absmean {got_mean} vs {want_mean}"
        );
        // On Gaussian weights the absmean rule keeps more of the matrix.
        assert!(want_mean < want_max, "{name}: {want_mean} !< {want_max}");
    }
    assert_eq!(ternary, 7, "every layer matrix is planned TQ2_0");

    for ty in ["TQ1_0", "TQ2_0"] {
        let out = env.dir.path().join(format!("{ty}.gguf"));
        env.run(&[
            "quantize",
            src.to_str().unwrap(),
            "--type",
            ty,
            "--ternary-scale",
            "absmean-channel",
            "--output",
            out.to_str().unwrap(),
        ])
        .ok();
        let file = xllm::model::gguf::GgufFile::open(&out).unwrap();
        let name = "blk.0.ffn_down.weight";
        let info = file.side_tensor(name).unwrap().clone();
        let data = file.side_bytes(name).unwrap();
        assert_eq!(info.ty.name, ty);
        let mut got = vec![0f32; info.dims.iter().product()];
        xllm::kernels::quant_blocks::dequantize(info.ty, &data, &mut got).unwrap();
        let w = tensor_values(name, &[FF, HIDDEN]);
        assert_eq!(got, absmean_channel(&w, FF as usize), "{ty}");
    }

    env.run(&[
        "quantize",
        src.to_str().unwrap(),
        "--type",
        "TQ2_0",
        "--ternary-scale",
        "absmin",
        "--dry-run",
    ])
    .fails_with(2, "absmean-channel");
}
