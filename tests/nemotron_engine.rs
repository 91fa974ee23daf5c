//! Nemotron-H through the engine's scheduler: prompt prefixes reused with their recurrent (Mamba)
//! state, from snapshots at block boundaries, give exactly the tokens of a run from scratch; and
//! `<think>` reasoning is split from the answer. Tiny random fixture (tests/fixtures/nemotron_h_a,
//! whose numbers are checked against transformers in tests/nemotron_parity.rs).

use std::path::PathBuf;
use std::sync::Arc;

use xllm::engine::chat_template::Message;
use xllm::engine::request::{GenerationRequest, OutputMode};
use xllm::engine::sampler::SamplingParams;
use xllm::engine::scheduler::{collecting_sink, Collected, EngineConfig, Scheduler};
use xllm::engine::session::{self, ChatOptions, ModelSession, OpenOptions};
use xllm::state::BLOCK_TOKENS;

fn open(name: &str) -> Arc<ModelSession> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let options = OpenOptions {
        device: Some("cpu".into()),
        ctx: Some(512),
        ..OpenOptions::default()
    };
    Arc::new(session::open(&dir.display().to_string(), &options).unwrap())
}

fn tokens(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (10 + (i * 7919 + salt * 104_729) % (vocab - 10)) as u32)
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let sampling = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let mut r = GenerationRequest::new(prompt, sampling);
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.logprobs = Some(0);
    r
}

/// The chosen tokens and their log-probabilities.
type Scored = (Vec<u32>, Vec<f32>);

fn scored(c: &Collected) -> Scored {
    (
        c.tokens.clone(),
        c.logprobs.iter().map(|l| l.logprob).collect(),
    )
}

/// Same tokens, and log-probabilities within 1e-3 (a state restored wrongly moves them far more;
/// where the prefill is cut differently they differ by rounding only).
fn assert_same(got: &Scored, want: &Scored, what: &str) {
    assert_eq!(got.0, want.0, "{what}: tokens");
    for (i, (a, b)) in got.1.iter().zip(&want.1).enumerate() {
        assert!((a - b).abs() < 1e-3, "{what}: logprob {i}: {a} vs {b}");
    }
}

fn run(scheduler: &mut Scheduler, request: GenerationRequest) -> Collected {
    let (sink, out) = collecting_sink();
    scheduler.submit(request, sink).unwrap();
    scheduler.run_to_completion().unwrap();
    let guard = out.lock().unwrap();
    assert!(guard.error.is_none(), "{:?}", guard.error);
    guard.clone()
}

/// What a scheduler without a prefix cache makes of `prompt`.
fn from_scratch(session: &Arc<ModelSession>, prompt: &[u32], max_tokens: usize) -> Scored {
    let mut config = EngineConfig::for_sequences(1, session.context);
    config.prefix_cache = false;
    let mut scheduler = Scheduler::new(session.clone(), config);
    scored(&run(&mut scheduler, greedy(prompt.to_vec(), max_tokens)))
}

#[test]
fn chat_turns_resume_from_recurrent_snapshots_with_identical_tokens() {
    for fixture in ["nemotron_h_a", "nemotron_h_b"] {
        let session = open(fixture);
        let vocab = session.info().vocab_size;
        let mut scheduler = Scheduler::new(session.clone(), EngineConfig::for_sequences(1, 512));
        // Turn 1: 150 prompt tokens; its snapshot is taken at the last block boundary before
        // the final token (128), and the answer's at 192 (150 + 80 read tokens crosses it).
        let first = tokens(vocab, 150, 1);
        let one = run(&mut scheduler, greedy(first.clone(), 81));
        assert_eq!(one.cached_tokens, 0);
        assert_same(&scored(&one), &from_scratch(&session, &first, 81), fixture);

        // Turn 2 leaves the previous prompt at its last token (as a `<think>` template does when
        // the history drops the reasoning): it resumes from the prompt's snapshot.
        let mut second = first[..149].to_vec();
        second.extend(tokens(vocab, 40, 2));
        let two = run(&mut scheduler, greedy(second.clone(), 12));
        assert_eq!(two.cached_tokens, 2 * BLOCK_TOKENS, "{fixture}");
        assert_eq!(two.stats.prompt_eval_count, second.len() - 2 * BLOCK_TOKENS);
        assert_same(&scored(&two), &from_scratch(&session, &second, 12), fixture);

        // Turn 3 quotes turn 1's whole exchange (as a template without reasoning does): it
        // resumes from the answer's snapshot at 192 tokens.
        let mut third = first.clone();
        third.extend(&one.tokens);
        third.extend(tokens(vocab, 30, 3));
        let three = run(&mut scheduler, greedy(third.clone(), 12));
        assert_eq!(three.cached_tokens, 3 * BLOCK_TOKENS, "{fixture}");
        assert_same(
            &scored(&three),
            &from_scratch(&session, &third, 12),
            fixture,
        );

        // A prompt that shares less than a snapshot's prefix runs from the start.
        let mut other = first[..100].to_vec();
        other.extend(tokens(vocab, 60, 4));
        let four = run(&mut scheduler, greedy(other.clone(), 6));
        assert_eq!(four.cached_tokens, 0, "{fixture}");
        assert_same(&scored(&four), &from_scratch(&session, &other, 6), fixture);
    }
}

#[test]
fn sequences_resume_from_a_snapshot_inside_a_mixed_batch() {
    let session = open("nemotron_h_a");
    let vocab = session.info().vocab_size;
    let mut config = EngineConfig::for_sequences(4, 512);
    config.step_tokens = 48;
    let mut scheduler = Scheduler::new(session.clone(), config);
    let base = tokens(vocab, 140, 5);
    run(&mut scheduler, greedy(base.clone(), 4));
    // Three sequences at once: two extend the cached prompt (and resume at 128), one does not.
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            let mut p = if i < 2 {
                base[..139].to_vec()
            } else {
                tokens(vocab, 90, 9)
            };
            p.extend(tokens(vocab, 7 + 11 * i, 6 + i));
            p
        })
        .collect();
    let mut outs = Vec::new();
    for p in &prompts {
        let (sink, out) = collecting_sink();
        scheduler.submit(greedy(p.clone(), 10), sink).unwrap();
        outs.push(out);
        scheduler.step().unwrap();
    }
    scheduler.run_to_completion().unwrap();
    for (i, (p, out)) in prompts.iter().zip(&outs).enumerate() {
        let out = out.lock().unwrap();
        let cached = if i < 2 { 2 * BLOCK_TOKENS } else { 0 };
        assert_eq!(out.cached_tokens, cached, "sequence {i}");
        assert_same(
            &scored(&out),
            &from_scratch(&session, p, 10),
            &format!("sequence {i}"),
        );
    }
}

#[test]
fn snapshots_beyond_the_limit_are_dropped_oldest_first() {
    let session = open("nemotron_h_a");
    let vocab = session.info().vocab_size;
    let mut config = EngineConfig::for_sequences(1, 512);
    config.recurrent_snapshots = 1;
    let mut scheduler = Scheduler::new(session.clone(), config);
    let a = tokens(vocab, 100, 7);
    let b = tokens(vocab, 100, 8);
    run(&mut scheduler, greedy(a.clone(), 2));
    run(&mut scheduler, greedy(b.clone(), 2));
    let mut again_b = b[..99].to_vec();
    again_b.push(11);
    assert_eq!(
        run(&mut scheduler, greedy(again_b, 2)).cached_tokens,
        BLOCK_TOKENS
    );
    let mut again_a = a[..99].to_vec();
    again_a.push(11);
    assert_eq!(
        run(&mut scheduler, greedy(again_a, 2)).cached_tokens,
        0,
        "a's snapshot went when b's came"
    );
}

#[test]
fn think_template_switch_and_reasoning_split() {
    let session = open("nemotron_h_a");
    let tags = session
        .think
        .expect("the fixture's template reasons in <think>");
    let chat = [Message::new("user", "Tell me about the river.")];
    let prompt = |thinking: Option<bool>| {
        session
            .chat_prompt(
                &chat,
                ChatOptions {
                    thinking,
                    ..ChatOptions::default()
                },
            )
            .unwrap()
    };
    let tokenizer = &session.loaded.tokenizer;
    let on = prompt(None);
    assert_eq!(prompt(Some(true)), on, "the template's default is on");
    let off = prompt(Some(false));
    assert_eq!(
        &on[on.len() - 2..],
        &[tags.open, tokenizer.encode("\n", false).unwrap()[0]]
    );
    assert_eq!(&off[off.len() - 2..], &[tags.open, tags.close]);
    assert_eq!(
        session.output_mode_for(&on),
        OutputMode::Think { reasoning: true }
    );
    assert_eq!(
        session.output_mode_for(&off),
        OutputMode::Think { reasoning: false }
    );

    // The generated tokens decide the split: before `</think>` reasoning, after it the answer
    // (the random fixture rarely writes the tag; the split itself is unit-tested in
    // engine::postprocess).
    let mut scheduler = Scheduler::new(session.clone(), EngineConfig::for_sequences(1, 512));
    let mut request = greedy(on.clone(), 24);
    request.output = session.output_mode_for(&on);
    let thought = run(&mut scheduler, request);
    let close = thought.tokens.iter().position(|&t| t == tags.close);
    let (reasoning_ids, answer_ids) = match close {
        Some(i) => (&thought.tokens[..i], &thought.tokens[i + 1..]),
        None => (&thought.tokens[..], &[][..]),
    };
    assert_eq!(thought.reasoning, tokenizer.decode(reasoning_ids).unwrap());
    assert_eq!(
        thought.text,
        tokenizer.decode(answer_ids).unwrap().trim_start()
    );
    // With reasoning off everything is the answer.
    let mut request = greedy(off.clone(), 8);
    request.output = session.output_mode_for(&off);
    let plain = run(&mut scheduler, request);
    assert!(plain.reasoning.is_empty());
}
