//! `xllm quantize` against llama.cpp (tests/fixtures/quantize/llama_cpp_reference.json, made by
//! scripts/make_quantize_fixtures.py): our block bytes must equal gguf-py's quantizers' (Q8_0,
//! Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, BF16) on the same values; where the fixture also holds
//! llama-quantize's outputs, the type chosen for every tensor and its bytes must match those.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use sha2::{Digest, Sha256};
use xllm::quantize::gguf::{GgufReader, GgufWriter, Metadata, OutTensor, Value};
use xllm::quantize::imatrix::Imatrix;
use xllm::quantize::{self, FileType, GgmlType};

const HIDDEN: u64 = 256;
const FF: u64 = 512;
const LAYERS: usize = 8;
const VOCAB: u64 = 256;
const HEADS: u64 = 4;
const KV_HEADS: u64 = 2;

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string("tests/fixtures/quantize/llama_cpp_reference.json")
        .expect("reference fixture");
    serde_json::from_str(&text).unwrap()
}

fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for b in s.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    if h == 0 {
        1
    } else {
        h
    }
}

/// The same exact values as scripts/make_quantize_fixtures.py's `synthetic_values`.
fn synthetic_values(name: &str, ne: &[u64]) -> Vec<f32> {
    let n0 = ne[0] as usize;
    let count: u64 = ne.iter().product();
    let mut s = fnv1a(name);
    let one_d = ne.len() == 1;
    (0..count as usize)
        .map(|k| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let mut m = ((s >> 9) as i64 - (1 << 22)) as f64 * 2f64.powi(-27);
            if k % 61 == 7 {
                m *= 8.0;
            }
            m *= 2f64.powi(((k / n0) % 4) as i32 - 2);
            if one_d {
                m = 1.0 + 8.0 * m;
            }
            m as f32
        })
        .collect()
}

fn synthetic_tensors() -> Vec<(String, Vec<u64>)> {
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![HIDDEN, VOCAB]),
        ("output_norm.weight".to_string(), vec![HIDDEN]),
        ("output.weight".to_string(), vec![HIDDEN, VOCAB]),
    ];
    for i in 0..LAYERS {
        for (n, ne) in [
            ("attn_norm.weight", vec![HIDDEN]),
            ("attn_q.weight", vec![HIDDEN, HIDDEN]),
            ("attn_k.weight", vec![HIDDEN, HIDDEN / HEADS * KV_HEADS]),
            ("attn_v.weight", vec![HIDDEN, HIDDEN / HEADS * KV_HEADS]),
            ("attn_output.weight", vec![HIDDEN, HIDDEN]),
            ("ffn_norm.weight", vec![HIDDEN]),
            ("ffn_gate.weight", vec![HIDDEN, FF]),
            ("ffn_up.weight", vec![HIDDEN, FF]),
            ("ffn_down.weight", vec![FF, HIDDEN]),
        ] {
            t.push((format!("blk.{i}.{n}"), ne));
        }
    }
    t
}

/// The synthetic F32 source, written by our writer with gguf-py's key order.
fn write_synthetic(path: &Path) {
    let mut md = Metadata::default();
    md.set("general.architecture", Value::Str("llama".into()));
    md.set("llama.block_count", Value::U32(LAYERS as u32));
    md.set("llama.context_length", Value::U32(256));
    md.set("llama.embedding_length", Value::U32(HIDDEN as u32));
    md.set("llama.feed_forward_length", Value::U32(FF as u32));
    md.set("llama.attention.head_count", Value::U32(HEADS as u32));
    md.set("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32));
    md.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    // Present in the source so the whole-file check covers where llama-quantize puts it (the end).
    md.set("general.file_type", Value::U32(0));
    let tensors = synthetic_tensors();
    let outs: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, ne)| OutTensor {
            name: n.clone(),
            ne: ne.clone(),
            ty: GgmlType::F32,
            size: ne.iter().product::<u64>() * 4,
        })
        .collect();
    let mut w = GgufWriter::create(path, &md, &outs, 32, false).unwrap();
    for (n, ne) in &tensors {
        let bytes: Vec<u8> = synthetic_values(n, ne)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

type Tensors = BTreeMap<String, (String, String)>;

/// Quantizes `src` to `ty`: every output tensor's (type, sha256) and the file's sha256.
fn quantize_to(src: &Path, ty: &str) -> (Tensors, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let source = quantize::open_source(src).unwrap();
    let prepared = quantize::prepare(source.as_ref(), FileType::parse(ty).unwrap(), None).unwrap();
    let written = quantize::execute(
        source.as_ref(),
        &prepared,
        &out,
        true,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let r = GgufReader::open(&out).unwrap();
    let tensors = r
        .tensors
        .iter()
        .map(|t| (t.name.clone(), (t.ty.name(), sha(r.data(t)))))
        .collect();
    (tensors, written.sha256.unwrap())
}

fn reference_tensors(entry: &serde_json::Value) -> Tensors {
    entry["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(n, w)| {
            (
                n.clone(),
                (
                    w[0].as_str().unwrap().to_string(),
                    w[1].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn gpt_oss_matches_llama_quantize_and_keeps_mxfp4_experts() {
    // llama.cpp's converter output (committed) re-quantized: every tensor but the MXFP4 experts
    // equals llama-quantize's; the experts (which llama-quantize requantizes unless asked for its
    // MXFP4_MOE type) stay byte for byte as in the source.
    let refj = reference();
    if !llama_quantize_section(&refj, "gpt_oss_tiny") {
        return;
    }
    let src = Path::new("tests/fixtures/quantize/gpt_oss_tiny.bf16.gguf");
    let section = refj["gpt_oss_tiny"].as_object().unwrap();
    let source = reference_tensors(&section["source"]);
    let mut problems = vec![];
    let (mut experts, mut others) = (0, 0);
    for (ty, want) in section.iter().filter(|(k, _)| k.as_str() != "source") {
        let want = reference_tensors(want);
        let (ours, _) = quantize_to(src, ty);
        assert_eq!(ours.len(), want.len(), "{ty}: tensor count");
        for (name, (oty, osha)) in &ours {
            let (sty, ssha) = &source[name];
            if sty == "MXFP4" {
                experts += 1;
                if (oty, osha) != (sty, ssha) {
                    problems.push(format!("{ty} {name}: MXFP4 expert not kept ({oty})"));
                }
            } else {
                others += 1;
                let (wty, wsha) = &want[name];
                if oty != wty {
                    problems.push(format!("{ty} {name}: type {oty}, llama.cpp {wty}"));
                } else if osha != wsha {
                    problems.push(format!("{ty} {name}: bytes differ ({wty})"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        experts > 0 && others > 0,
        "{experts} experts, {others} others"
    );
}

#[test]
fn gpt_oss_from_safetensors_matches_llama_cpp_converter_and_quantize() {
    // The safetensors fixture quantized directly: BF16 equals llama.cpp's convert_hf_to_gguf.py
    // output tensor for tensor (MXFP4 experts repacked, gate/up split, names); every other type
    // equals llama-quantize run on that converter output (experts kept as the converter wrote
    // them); and the metadata equals the converter's, key for key.
    let refj = reference();
    if !llama_quantize_section(&refj, "gpt_oss_tiny") {
        return;
    }
    let src = Path::new("tests/fixtures/gpt_oss_tiny");
    let section = refj["gpt_oss_tiny"].as_object().unwrap();
    let converter = reference_tensors(&section["source"]);
    let (ours, _) = quantize_to(src, "BF16");
    assert_eq!(ours.len(), converter.len(), "BF16: tensor count");
    for (name, want) in &converter {
        assert_eq!(ours.get(name), Some(want), "BF16 {name} vs the converter");
    }
    let mut problems = vec![];
    let mut mxfp4 = 0;
    for (ty, want) in section.iter().filter(|(k, _)| k.as_str() != "source") {
        let want = reference_tensors(want);
        let (ours, _) = quantize_to(src, ty);
        assert_eq!(ours.len(), want.len(), "{ty}: tensor count");
        for (name, got) in &ours {
            let expect = if converter[name].0 == "MXFP4" {
                mxfp4 += 1;
                &converter[name]
            } else {
                &want[name]
            };
            if got != expect {
                problems.push(format!("{ty} {name}: ours {got:?}, llama.cpp {expect:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(mxfp4, 12 * (section.len() - 1));

    let source = quantize::open_source(src).unwrap();
    let ours = quantize::prepare(source.as_ref(), FileType::parse("BF16").unwrap(), None)
        .unwrap()
        .metadata;
    let theirs = GgufReader::open(Path::new("tests/fixtures/quantize/gpt_oss_tiny.bf16.gguf"))
        .unwrap()
        .metadata;
    // Not compared: the name (from the folder), the size label (we write none) and the two keys
    // quantizing sets and moves to the end (the converter calls a bf16 file with MXFP4 experts
    // MOSTLY_MXFP4_MOE; ours says BF16, which is what it asked for).
    let skip = [
        "general.name",
        "general.size_label",
        "general.file_type",
        "general.quantization_version",
    ];
    let keys = |m: &Metadata| -> Vec<String> {
        m.0.iter()
            .map(|(k, _)| k.clone())
            .filter(|k| !skip.contains(&k.as_str()))
            .collect()
    };
    assert_eq!(keys(&ours), keys(&theirs), "metadata keys and order");
    for (k, v) in &theirs.0 {
        if !skip.contains(&k.as_str()) {
            assert_eq!(ours.get(k), Some(v), "metadata '{k}'");
        }
    }
}

/// Quantizes `src` to `ty` and compares with the reference entry; returns mismatch descriptions.
fn compare(src: &Path, ty: &str, want: &serde_json::Value, whole_file: bool) -> Vec<String> {
    compare_with(src, ty, want, whole_file, None)
}

/// [`compare`] with an importance matrix (the path string as llama-quantize was given it).
fn compare_with(
    src: &Path,
    ty: &str,
    want: &serde_json::Value,
    whole_file: bool,
    imatrix: Option<&str>,
) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let source = quantize::open_source(src).unwrap();
    let m = imatrix.map(|p| Imatrix::read(Path::new(p)).unwrap());
    let table = m.as_ref().map(Imatrix::importance);
    let prepared = quantize::prepare(
        source.as_ref(),
        FileType::parse(ty).unwrap(),
        imatrix.zip(m.as_ref()),
    )
    .unwrap();
    let written = quantize::execute(
        source.as_ref(),
        &prepared,
        &out,
        true,
        table.as_ref().map(|t| t as &dyn quantize::Importance),
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let r = GgufReader::open(&out).unwrap();
    let mut problems = vec![];
    let want_tensors = want["tensors"].as_object().unwrap();
    let mut ours: BTreeMap<String, (String, String)> = BTreeMap::new();
    for t in &r.tensors {
        ours.insert(t.name.clone(), (t.ty.name(), sha(r.data(t))));
    }
    for (name, w) in want_tensors {
        let (wt, ws) = (w[0].as_str().unwrap(), w[1].as_str().unwrap());
        match ours.get(name) {
            None => problems.push(format!("{ty} {name}: missing")),
            Some((t, _)) if t != wt => {
                problems.push(format!("{ty} {name}: type {t}, llama.cpp {wt}"))
            }
            Some((_, s)) if s != ws => problems.push(format!("{ty} {name}: bytes differ ({wt})")),
            _ => {}
        }
    }
    if ours.len() != want_tensors.len() {
        problems.push(format!(
            "{ty}: {} tensors, llama.cpp {}",
            ours.len(),
            want_tensors.len()
        ));
    }
    if whole_file
        && problems.is_empty()
        && written.sha256.as_deref() != want["file_sha256"].as_str()
    {
        problems.push(format!(
            "{ty}: tensors match but the file bytes differ (metadata or layout)"
        ));
    }
    problems
}

#[test]
fn block_bytes_match_gguf_py_quantizers() {
    let refj = reference();
    let shapes: BTreeMap<String, Vec<u64>> = synthetic_tensors().into_iter().collect();
    let mut checked = 0;
    for (ty, tensors) in refj["gguf_py"].as_object().unwrap() {
        let gty = match ty.as_str() {
            "BF16" => GgmlType::BF16,
            "Q8_0" => GgmlType::Q8_0,
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            "Q5_0" => GgmlType::Q5_0,
            "Q5_1" => GgmlType::Q5_1,
            "TQ1_0" => GgmlType::TQ1_0,
            "TQ2_0" => GgmlType::TQ2_0,
            other => panic!("unexpected type {other}"),
        };
        for (name, want) in tensors.as_object().unwrap() {
            let ne = &shapes[name];
            let x = synthetic_values(name, ne);
            let n = ne[0] as usize;
            let mut out = vec![0u8; gty.row_bytes(n).unwrap() * (x.len() / n)];
            quantize::blocks::quantize_rows(gty, &x, n, None, &mut out).unwrap();
            assert_eq!(&sha(&out), want.as_str().unwrap(), "{ty} {name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
}

fn llama_quantize_section(refj: &serde_json::Value, key: &str) -> bool {
    if refj.get(key).is_none() {
        eprintln!("skipped: the fixture has no llama-quantize outputs yet ({key}); run scripts/make_quantize_fixtures.py with llama.cpp built");
        return false;
    }
    true
}

#[test]
fn synthetic_source_matches_gguf_py_byte_for_byte() {
    let refj = reference();
    if !llama_quantize_section(&refj, "synthetic") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("synthetic-f32.gguf");
    write_synthetic(&src);
    let bytes = std::fs::read(&src).unwrap();
    assert_eq!(
        sha(&bytes),
        refj["synthetic"]["source"]["file_sha256"].as_str().unwrap(),
        "our F32 GGUF differs from gguf-py's"
    );
}

#[test]
fn every_type_matches_llama_quantize_on_the_synthetic_model() {
    let refj = reference();
    if !llama_quantize_section(&refj, "synthetic") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("synthetic-f32.gguf");
    write_synthetic(&src);
    let mut problems = vec![];
    for ty in refj["types"].as_array().unwrap() {
        let ty = ty.as_str().unwrap();
        problems.extend(compare(&src, ty, &refj["synthetic"][ty], true));
    }
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_type_matches_llama_quantize_on_tiny_llama_safetensors() {
    // convert_hf_to_gguf.py + llama-quantize vs xllm straight from safetensors: same tensor names,
    // types (every K-quant falls back: rows of 64) and bytes.
    let refj = reference();
    if !llama_quantize_section(&refj, "tiny_llama") {
        return;
    }
    let mut problems = vec![];
    for ty in refj["types"].as_array().unwrap() {
        let ty = ty.as_str().unwrap();
        problems.extend(compare(
            Path::new("tests/fixtures/tiny-llama"),
            ty,
            &refj["tiny_llama"][ty],
            false,
        ));
    }
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// `--imatrix`: with the same importance matrix (tests/fixtures/quantize/synthetic.imatrix.gguf,
/// llama.cpp's GGUF imatrix format), every type's tensors and the whole file equal
/// llama-quantize's (scripts/make_imatrix_fixtures.py), and the weighting changed the bytes.
#[test]
fn imatrix_quantization_matches_llama_quantize() {
    let path = "tests/fixtures/quantize/imatrix_reference.json";
    let Ok(text) = std::fs::read_to_string(path) else {
        eprintln!(
            "skipped: {path} missing; run scripts/make_imatrix_fixtures.py with llama.cpp built"
        );
        return;
    };
    let refj: serde_json::Value = serde_json::from_str(&text).unwrap();
    let imatrix = refj["imatrix"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("synthetic-f32.gguf");
    write_synthetic(&src);
    let plain = reference();
    let mut problems = vec![];
    let mut changed = 0;
    for (ty, want) in refj["synthetic"].as_object().unwrap() {
        if ty == "source" {
            continue;
        }
        problems.extend(compare_with(&src, ty, want, true, Some(imatrix)));
        // Against the plain (no imatrix) reference: the weighted types must differ.
        let unweighted = &plain["synthetic"][ty.as_str()]["tensors"];
        if unweighted["blk.0.attn_q.weight"] != want["tensors"]["blk.0.attn_q.weight"] {
            changed += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // Every type but Q8_0 weighs the error.
    assert_eq!(changed, refj["types"].as_array().unwrap().len() - 1);
}

/// `--imatrix` on expert tensors: llama.cpp's conversion of the Nemotron-H MoE fixture
/// (tests/fixtures/quantize/nemotron_h_a.bf16.gguf) with llama-imatrix's matrix of it, whose
/// `ffn_up_exps`/`ffn_down_exps` hold one row of sums and one count per expert: every tensor and
/// the whole file equal llama-quantize's (so each expert's slice weighs that expert's rows), and
/// the weighted files differ from the unweighted ones (scripts/make_imatrix_fixtures.py).
#[test]
fn imatrix_per_expert_quantization_matches_llama_quantize() {
    let path = "tests/fixtures/quantize/imatrix_moe_reference.json";
    let Ok(text) = std::fs::read_to_string(path) else {
        eprintln!(
            "skipped: {path} missing; run scripts/make_imatrix_fixtures.py with llama.cpp built"
        );
        return;
    };
    let refj: serde_json::Value = serde_json::from_str(&text).unwrap();
    let imatrix = refj["imatrix"].as_str().unwrap();
    let src = Path::new("tests/fixtures/quantize/nemotron_h_a.bf16.gguf");
    let m = Imatrix::read(Path::new(imatrix)).unwrap();
    assert_eq!(m.entries["blk.1.ffn_up_exps.weight"].counts.len(), 12);
    let mut problems = vec![];
    let mut weighted = 0;
    for ty in refj["types"].as_array().unwrap() {
        let ty = ty.as_str().unwrap();
        let want = &refj["nemotron_h_a"][ty];
        let plain = &refj["nemotron_h_a_plain"][ty];
        problems.extend(compare_with(src, ty, want, true, Some(imatrix)));
        problems.extend(compare_with(src, ty, plain, true, None));
        // 64-wide expert rows fall back from K-quants to Q4_0/Q5_0/Q8_0; Q8_0 ignores importance.
        let (w, p) = (
            &want["tensors"]["blk.1.ffn_up_exps.weight"],
            &plain["tensors"]["blk.1.ffn_up_exps.weight"],
        );
        if w[0] != "Q8_0" {
            weighted += 1;
            assert_ne!(w, p, "{ty}: the importance changed nothing in the experts");
        }
    }
    assert!(
        problems.is_empty(),
        "{} mismatches:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(weighted >= 2, "{weighted} types weigh the expert rows");
}
