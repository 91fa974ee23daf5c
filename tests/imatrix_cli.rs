//! `xllm imatrix` end to end on the tiny llama fixture (a copy, so the cache lands in a temp
//! folder): the first layer's q/k/v input statistics equal the ones computed here from the
//! checkpoint (embedding rows → RMSNorm), counts are chunks × ctx for every weight, the text
//! choice is printed, the result is cached, `.dat` output reads back, `quantize --imatrix` uses
//! it, and bad requests get clear errors.

mod common;

use std::path::Path;

use common::*;
use xllm::quantize::imatrix::Imatrix;

const TINY: &str = "tests/fixtures/tiny-llama";

fn copy_fixture(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(TINY).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Σ over the chunks' tokens of (RMSNorm(embedding) ⊙ attn_norm)², per column: the input of
/// blk.0.attn_q/k/v, independent of attention.
fn layer0_input_sums(model: &Path, chunks: &[Vec<u32>]) -> Vec<f64> {
    let w = xllm::model::safetensors::SafetensorsWeights::open_dir(model).unwrap();
    let cpu = candle_core::Device::Cpu;
    let f32 = candle_core::DType::F32;
    let embed: Vec<Vec<f32>> = w
        .load("model.embed_tokens.weight", f32, &cpu)
        .unwrap()
        .to_vec2()
        .unwrap();
    let norm: Vec<f32> = w
        .load("model.layers.0.input_layernorm.weight", f32, &cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut sums = vec![0f64; norm.len()];
    for chunk in chunks {
        for &t in chunk {
            let row = &embed[t as usize];
            let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for (j, s) in sums.iter_mut().enumerate() {
                let y = row[j] as f64 * inv * norm[j] as f64;
                *s += y * y;
            }
        }
    }
    sums
}

#[test]
fn statistics_match_the_checkpoint_and_are_cached() {
    let env = Env::new("http://127.0.0.1:9");
    let model = env.dir.path().join("tiny");
    copy_fixture(&model);
    let text = std::fs::read_to_string(model.join("text.txt")).unwrap();
    let text_file = env.dir.path().join("cal.txt");
    std::fs::write(&text_file, text.repeat(3)).unwrap();
    let out = env.dir.path().join("tiny.imatrix.gguf");
    let (m, t, o) = (
        model.to_str().unwrap(),
        text_file.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let run = env
        .run(&[
            "imatrix", m, "--file", t, "--ctx", "16", "--chunks", "5", "-o", o,
        ])
        .ok();
    assert!(run.stderr.contains("(--file)"), "{}", run.stderr);
    let im = Imatrix::read(&out).unwrap();
    assert_eq!((im.chunk_count, im.chunk_size), (5, 16));
    assert_eq!(im.datasets, vec![t.to_string()]);
    // 2 layers x q, k, v, o, gate, up, down; the LM head is not collected (as llama-imatrix).
    assert_eq!(im.entries.len(), 14, "{:?}", im.entries.keys());
    assert!(!im.entries.contains_key("output.weight"));
    for (name, e) in &im.entries {
        assert_eq!(e.counts, vec![80.0], "{name}");
        let cols = if name.contains("ffn_down") { 128 } else { 64 };
        assert_eq!(e.sums.len(), cols, "{name}");
        assert!(e.sums.iter().all(|&v| v > 0.0 && v.is_finite()), "{name}");
    }

    // Independent: the tokens as xllm tokenize gives them, BOS first in every chunk.
    let ids: Vec<u32> = env
        .run(&["tokenize", m, &text.repeat(3), "--json"])
        .ok()
        .json()["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // bos_token_id 1 in config.json: replaced into every chunk's first slot when the
    // tokenizer adds it.
    let bos = (ids[0] == 1).then_some(1u32);
    let chunks: Vec<Vec<u32>> = (0..5)
        .map(|c| {
            let mut ch = ids[c * 16..(c + 1) * 16].to_vec();
            if let Some(b) = bos {
                ch[0] = b;
            }
            ch
        })
        .collect();
    let want = layer0_input_sums(&model, &chunks);
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
    ] {
        let got = &im.entries[name].sums;
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= 1e-4 * w.abs() + 1e-6,
                "{name} column {j}: {g} vs {w}"
            );
        }
    }

    // Same model, text and settings: served from the cache next to the model.
    let out2 = env.dir.path().join("again.dat");
    let run = env
        .run(&[
            "imatrix",
            m,
            "--file",
            t,
            "--ctx",
            "16",
            "--chunks",
            "5",
            "-o",
            out2.to_str().unwrap(),
        ])
        .ok();
    assert!(run.stderr.contains("previous run"), "{}", run.stderr);
    assert!(files_under(&model)
        .iter()
        .any(|f| f.starts_with(".imatrix-cache/")));
    let dat = Imatrix::read(&out2).unwrap();
    assert!(dat.legacy);
    let (a, b) = (im.importance(), dat.importance());
    for name in im.entries.keys() {
        for (x, y) in a.0[name].iter().zip(&b.0[name]) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{name}: {x} vs {y}");
        }
    }

    // quantize --imatrix uses it (Q4_0 on 64-wide rows: the weighted legacy path) and says so;
    // the bytes differ from the unweighted file.
    let q_plain = env.dir.path().join("plain.gguf");
    let q_weighted = env.dir.path().join("weighted.gguf");
    env.run(&[
        "quantize",
        m,
        "--type",
        "Q4_0",
        "-o",
        q_plain.to_str().unwrap(),
    ])
    .ok();
    let run = env
        .run(&[
            "quantize",
            m,
            "--type",
            "Q4_0",
            "--imatrix",
            o,
            "-o",
            q_weighted.to_str().unwrap(),
        ])
        .ok();
    assert!(
        run.stderr.contains("importance matrix: 14 entries"),
        "{}",
        run.stderr
    );
    assert_ne!(
        std::fs::read(&q_plain).unwrap(),
        std::fs::read(&q_weighted).unwrap()
    );
    let ppl = env
        .run(&[
            "perplexity",
            q_weighted.to_str().unwrap(),
            "-f",
            text_file.to_str().unwrap(),
            "--json",
        ])
        .ok()
        .json()["perplexity"]
        .as_f64()
        .unwrap();
    assert!(ppl.is_finite());
}

#[test]
fn text_choice_and_errors_are_explained() {
    let env = Env::new("http://127.0.0.1:9");
    let model = env.dir.path().join("tiny");
    copy_fixture(&model);
    let m = model.to_str().unwrap();
    let out = env.dir.path().join("x.gguf");
    let o = out.to_str().unwrap();
    // No --file, no calibration.txt: the built-in text.
    let run = env
        .run(&["imatrix", m, "--ctx", "16", "--chunks", "2", "-o", o])
        .ok();
    assert!(
        run.stderr.contains("built-in calibration text"),
        "{}",
        run.stderr
    );
    // A calibration.txt next to the model wins over the built-in text.
    std::fs::write(model.join("calibration.txt"), "hello world ".repeat(40)).unwrap();
    let run = env
        .run(&["imatrix", m, "--ctx", "16", "--chunks", "2", "-o", o])
        .ok();
    assert!(
        run.stderr.contains("calibration.txt in the model's folder"),
        "{}",
        run.stderr
    );
    // Too short a text, bad numbers, a bad imatrix for quantize.
    let short = env.dir.path().join("short.txt");
    std::fs::write(&short, "hi").unwrap();
    env.run(&[
        "imatrix",
        m,
        "--file",
        short.to_str().unwrap(),
        "--ctx",
        "16",
        "-o",
        o,
    ])
    .fails_with(1, "less than one chunk");
    env.run(&["imatrix", m, "--ctx", "512", "-o", o])
        .fails_with(1, "exceeds the model's context length");
    env.run(&["imatrix", m, "--ctx", "4", "-o", o])
        .fails_with(1, "--ctx must be at least 16");
    let junk = env.dir.path().join("junk.dat");
    std::fs::write(&junk, [7u8; 3]).unwrap();
    env.run(&[
        "quantize",
        m,
        "--type",
        "Q4_K_M",
        "--imatrix",
        junk.to_str().unwrap(),
        "-o",
        env.dir.path().join("q.gguf").to_str().unwrap(),
    ])
    .fails_with(1, "importance matrix");
    // Q2_K without an imatrix warns.
    let run = env
        .run(&[
            "quantize",
            m,
            "--type",
            "Q2_K",
            "-o",
            env.dir.path().join("q2.gguf").to_str().unwrap(),
        ])
        .ok();
    assert!(
        run.stderr.contains("without an importance matrix"),
        "{}",
        run.stderr
    );
}
