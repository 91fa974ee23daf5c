//! Continuous batching: many sequences advance together, one batched forward pass per step.
//!
//! Each [`Scheduler::step`] builds one batch under a token budget: first one token for every
//! sequence that is decoding, then chunks of waiting prompts with what is left (chunked
//! prefill), so a long prompt never stalls the streams. Sequences join and leave between steps.
//! KV memory comes from one [`BlockPool`]; before a step the blocks it needs are found by
//! evicting unused prefix-cache blocks, else by preempting the newest sequence (its state is
//! dropped and recomputed when it is readmitted) — never by failing a request. Prompt prefixes
//! already computed (by a running or finished sequence) are adopted instead of recomputed.
//!
//! Nothing here prints or blocks: every event of a request goes to its [`EventSink`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::generate::{FinishReason, GenerationStats};
use super::postprocess::OutputStream;
use super::prefix_cache::PrefixCache;
use super::request::{EventSink, GenerationRequest, Output, SeqEvent, SubmitError, TokenLogprob};
use super::sampler::Sampler;
use super::session::ModelSession;
use super::structured::Constraint;
use super::tokenizer::TextTokenizer;
use crate::arch::{BatchSeq, Logits, PROMPT_CHUNK};
use crate::state::{blocks_for, BlockPool, SequenceState, BLOCK_TOKENS};

/// How the scheduler batches and how much it may hold.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences running at once.
    pub max_sequences: usize,
    /// Tokens per step (decode tokens plus prompt chunks).
    pub step_tokens: usize,
    /// KV pool size in tokens (rounded up to whole blocks).
    pub kv_tokens: usize,
    /// Requests that may wait for a slot before new ones are refused as overloaded.
    pub max_waiting: usize,
    /// Reuse computed prompt prefixes across sequences.
    pub prefix_cache: bool,
    /// Recurrent-state snapshots the prefix cache keeps (models with recurrent layers; each is
    /// one sequence's recurrent state, outside the KV pool).
    pub recurrent_snapshots: usize,
}

impl EngineConfig {
    /// A configuration for `max_sequences` sequences of up to `context` tokens each.
    pub fn for_sequences(max_sequences: usize, context: usize) -> Self {
        let max_sequences = max_sequences.max(1);
        Self {
            max_sequences,
            step_tokens: PROMPT_CHUNK,
            // Whole blocks per sequence: a pool of `max_sequences × context` tokens would
            // preempt a sequence when every one of them ends a block at once.
            kv_tokens: max_sequences.saturating_mul(blocks_for(context.max(1)) * BLOCK_TOKENS),
            max_waiting: 256,
            prefix_cache: true,
            // Per running sequence its prompt's and its answer's latest, and one turn back.
            recurrent_snapshots: 2 * max_sequences + 2,
        }
    }
}

/// A request's handle inside the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What the scheduler is doing (for metrics and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub prefix_cache_blocks: usize,
    /// Since start.
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
}

/// One sequence being served.
struct Active {
    id: RequestId,
    request: GenerationRequest,
    sink: EventSink,
    state: SequenceState,
    /// Prompt, then every sampled token; `state.len()` of them have been run.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    /// The grammar the answer follows, if any.
    constraint: Option<Constraint>,
    output: OutputStream,
    stats: GenerationStats,
    limit: usize,
    started: bool,
    admitted_at: Instant,
    first_logits_at: Option<Instant>,
    cancelled: bool,
    /// Recurrent models: the prompt's last block boundary (before its last token), where the
    /// recurrent state is snapshotted for reuse by a later prompt that extends this one.
    snapshot_at: Option<usize>,
}

impl Active {
    fn pending(&self) -> usize {
        self.tokens.len() - self.state.len()
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn emit(&mut self, event: SeqEvent) {
        if !(self.sink)(event) {
            self.cancelled = true;
        }
    }
}

/// The continuous-batching scheduler of one model.
pub struct Scheduler {
    session: Arc<ModelSession>,
    config: EngineConfig,
    pool: Arc<BlockPool>,
    prefix: PrefixCache,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    next_id: u64,
    stats: EngineStats,
}

impl Scheduler {
    pub fn new(session: Arc<ModelSession>, config: EngineConfig) -> Self {
        let pool = BlockPool::new(blocks_for(config.kv_tokens.max(1)));
        let prefix = PrefixCache::new(config.recurrent_snapshots);
        Self {
            session,
            config,
            pool,
            prefix,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
        }
    }

    pub fn session(&self) -> &Arc<ModelSession> {
        &self.session
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; its events go to `sink` as steps run.
    pub fn submit(
        &mut self,
        request: GenerationRequest,
        sink: EventSink,
    ) -> Result<RequestId, SubmitError> {
        if self.waiting.len() >= self.config.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting: self.waiting.len(),
            });
        }
        let limit = validate(&self.session, &self.config, &request)?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.enqueue(id, request, sink, limit);
        Ok(id)
    }

    /// Queues a request whose id the caller chose (the engine thread's handle numbers them).
    /// A request that does not validate is reported to its sink as `Failed`.
    pub fn submit_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        mut sink: EventSink,
    ) -> Result<(), SubmitError> {
        match validate(&self.session, &self.config, &request) {
            Ok(limit) => {
                self.next_id = self.next_id.max(id.0 + 1);
                self.enqueue(id, request, sink, limit);
                Ok(())
            }
            Err(e) => {
                sink(SeqEvent::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    fn enqueue(
        &mut self,
        id: RequestId,
        mut request: GenerationRequest,
        sink: EventSink,
        limit: usize,
    ) {
        let constraint = request.constraint.take();
        let info = self.session.info();
        let state = info.new_state(self.session.kv_profile(), &self.pool, limit);
        let output = OutputStream::new(
            request.output,
            &request.stop_strings,
            self.session.harmony.as_ref(),
            request.tool_calls,
            self.session.think,
        );
        let stats = GenerationStats {
            prompt_tokens: request.prompt.len(),
            ..Default::default()
        };
        let boundary = (request.prompt.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
        let snapshot_at =
            (self.config.prefix_cache && state.has_recurrent() && boundary > 0).then_some(boundary);
        self.waiting.push_back(Active {
            id,
            tokens: request.prompt.clone(),
            prompt_len: request.prompt.len(),
            sampler: Sampler::new(request.sampling.clone()),
            constraint,
            request,
            sink,
            state,
            output,
            stats,
            limit,
            started: false,
            admitted_at: Instant::now(),
            first_logits_at: None,
            cancelled: false,
            snapshot_at,
        });
    }

    /// Cancels a request: it finishes with [`FinishReason::Cancelled`] and frees its blocks at
    /// the next step.
    pub fn cancel(&mut self, id: RequestId) {
        for a in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if a.id == id {
                a.cancelled = true;
            }
        }
    }

    /// Cancels everything (shutdown).
    pub fn cancel_all(&mut self) {
        for a in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            a.cancelled = true;
        }
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.pool.used_blocks(),
            kv_blocks_total: self.pool.total_blocks(),
            prefix_cache_blocks: self.prefix.len(),
            ..self.stats.clone()
        }
    }

    /// Forgets every cached prefix (their blocks go back to the pool once no sequence uses them).
    pub fn clear_prefix_cache(&mut self) {
        self.prefix.clear();
    }

    /// One step: admit, batch, run the model once, sample, emit. Errors of the model fail the
    /// sequences of the batch (each gets [`SeqEvent::Failed`]); the scheduler stays usable.
    pub fn step(&mut self) -> anyhow::Result<()> {
        self.reap_cancelled();
        self.admit();
        let plan = self.plan();
        if plan.is_empty() {
            return Ok(());
        }
        self.stats.steps += 1;
        let t0 = Instant::now();
        let logits = match self.forward(&plan) {
            Ok(l) => l,
            Err(e) => {
                let message = format!("{e:#}");
                let ids: Vec<RequestId> = plan.iter().map(|&(i, _)| self.running[i].id).collect();
                for a in self.running.iter_mut().filter(|a| ids.contains(&a.id)) {
                    a.emit(SeqEvent::Failed(message.clone()));
                    a.cancelled = true;
                }
                self.running.retain(|a| !ids.contains(&a.id));
                return Ok(());
            }
        };
        let elapsed = t0.elapsed();
        let mut row = 0;
        // Each sequence that reached the end of its pending tokens gets its logits row.
        let mut rows: Vec<Option<Vec<f32>>> = (0..self.running.len()).map(|_| None).collect();
        for &(i, n) in &plan {
            let a = &mut self.running[i];
            if self.config.prefix_cache && a.state.has_recurrent() {
                if a.snapshot_at == Some(a.state.len()) {
                    a.state.snapshot(false);
                } else if a.first_logits_at.is_some() {
                    // While answering: the latest block boundary (a next turn that quotes the
                    // answer resumes from there).
                    a.state.snapshot(true);
                }
            }
            let was_prefill = a.first_logits_at.is_none();
            if a.pending() > 0 {
                // A prompt chunk that did not reach the end: no logits yet.
                a.stats.prompt_eval_count += n;
                continue;
            }
            rows[i] = Some(logits.get(row)?.to_vec1::<f32>()?);
            row += 1;
            if was_prefill {
                a.stats.prompt_eval_count += n;
                let now = Instant::now();
                a.stats.prompt_eval_duration = now - a.admitted_at;
                a.first_logits_at = Some(now);
            } else {
                a.stats.eval_duration += elapsed;
            }
        }
        // Choosing tokens (sampling, grammar masks) is independent per sequence: with more
        // than one constrained sequence it runs on the worker pool, so masks of a batch are
        // computed side by side.
        let tokenizer = &self.session.loaded.tokenizer;
        let constrained = self
            .running
            .iter()
            .zip(&rows)
            .filter(|(a, r)| r.is_some() && a.constraint.is_some())
            .count();
        let picks: Vec<Option<Result<Pick, String>>> = if constrained > 1 {
            use rayon::prelude::*;
            self.running
                .par_iter_mut()
                .zip(rows.into_par_iter())
                .map(|(a, r)| r.map(|logits| choose(a, logits, tokenizer)))
                .collect()
        } else {
            self.running
                .iter_mut()
                .zip(rows)
                .map(|(a, r)| r.map(|logits| choose(a, logits, tokenizer)))
                .collect()
        };
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        for (a, pick) in self.running.iter_mut().zip(picks) {
            match pick {
                None => {}
                Some(Err(e)) => failed.push((a.id, e)),
                Some(Ok(pick)) => {
                    if let Some(reason) = emit_pick(a, pick, tokenizer)? {
                        finished.push((a.id, reason));
                    }
                }
            }
        }
        for (id, message) in failed {
            if let Some(pos) = self.running.iter().position(|a| a.id == id) {
                let mut a = self.running.remove(pos);
                a.emit(SeqEvent::Failed(message));
            }
        }
        for (id, reason) in finished {
            self.finish(id, reason)?;
        }
        Ok(())
    }

    /// Runs every step until no request is left.
    pub fn run_to_completion(&mut self) -> anyhow::Result<()> {
        while self.has_work() {
            self.step()?;
        }
        Ok(())
    }

    /// Finishes cancelled sequences (running or waiting) and frees their blocks.
    fn reap_cancelled(&mut self) {
        let (mut done, running): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|a| a.cancelled);
        self.running = running;
        let (waiting_done, waiting): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|a| a.cancelled);
        self.waiting = waiting.into();
        done.extend(waiting_done);
        let tokenizer = &self.session.loaded.tokenizer;
        for mut a in done {
            let _ = a.output.finish(tokenizer);
            a.stats.kv_cache_bytes = a.state.allocated_bytes();
            let stats = a.stats.clone();
            a.emit(SeqEvent::Finished {
                reason: FinishReason::Cancelled,
                stats,
            });
        }
    }

    /// Moves waiting sequences into the running set while there are slots and blocks for their
    /// prompts, reusing cached prefixes.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_sequences {
            let Some(mut a) = self.waiting.pop_front() else {
                break;
            };
            if a.state.is_empty() && self.config.prefix_cache {
                if let Some(shared) = self.prefix.lookup(&a.tokens) {
                    if a.state.adopt(&shared).is_err() {
                        a.state.clear();
                    }
                }
            }
            // Room for the whole prompt (or what is left of it), besides what the prompts
            // already running still need and one block for each of them to grow: so a
            // sequence admitted (or readmitted after preemption) does not push another out at once.
            let committed: usize = self
                .running
                .iter()
                .map(|r| r.state.blocks_needed(r.pending()) + 1)
                .sum();
            let needed = committed + a.state.blocks_needed(a.pending());
            if !self.make_room(needed, false) {
                a.state.clear();
                self.waiting.push_front(a);
                break;
            }
            if !a.started {
                a.started = true;
                let cached = a.state.len();
                self.stats.prompt_tokens += a.prompt_len as u64;
                self.stats.cached_prompt_tokens += cached as u64;
                a.stats.prompt_tokens = a.prompt_len;
                a.admitted_at = Instant::now();
                a.emit(SeqEvent::Started {
                    prompt_tokens: a.prompt_len,
                    cached_tokens: cached,
                });
            }
            self.running.push(a);
        }
    }

    /// Frees blocks until `needed` are free: unused prefix-cache blocks first, then (when
    /// `preempt`) the newest running sequences. `false` when that is not enough.
    fn make_room(&mut self, needed: usize, preempt: bool) -> bool {
        while self.pool.free_blocks() < needed {
            if self.prefix.evict_one() {
                continue;
            }
            if !preempt || self.running.len() <= 1 {
                return false;
            }
            let mut victim = self.running.pop().expect("more than one running");
            victim.state.clear();
            self.stats.preemptions += 1;
            self.waiting.push_front(victim);
        }
        true
    }

    /// Chooses the tokens of this step: `(index into running, tokens)`.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        loop {
            let mut budget = self.config.step_tokens.max(1);
            let mut plan = Vec::new();
            for (i, a) in self.running.iter().enumerate() {
                if a.pending() == 1 && budget > 0 {
                    plan.push((i, 1));
                    budget -= 1;
                }
            }
            for (i, a) in self.running.iter().enumerate() {
                let pending = a.pending();
                if pending > 1 && budget > 0 {
                    let mut n = pending.min(budget).min(PROMPT_CHUNK);
                    // A chunk ends at the snapshot boundary, so the state is seen there.
                    if let Some(at) = a.snapshot_at.filter(|&at| at > a.state.len()) {
                        n = n.min(at - a.state.len());
                    }
                    plan.push((i, n));
                    budget -= n;
                }
            }
            let needed: usize = plan
                .iter()
                .map(|&(i, n)| self.running[i].state.blocks_needed(n))
                .sum();
            let before = self.running.len();
            let fits = self.make_room(needed, true);
            if self.running.len() != before {
                // Sequences were preempted: the plan's indices and budget are stale, plan again.
                continue;
            }
            if fits {
                plan.sort_unstable();
                return plan;
            }
            // One sequence alone does not fit the pool (its limit is capped by the pool size,
            // so this only happens when the cache holds what it needs): run what fits.
            plan.retain(|&(i, n)| {
                self.running[i].state.blocks_needed(n) <= self.pool.free_blocks()
            });
            plan.sort_unstable();
            return plan;
        }
    }

    fn forward(&mut self, plan: &[(usize, usize)]) -> candle_core::Result<Tensor> {
        let mut batch = Vec::with_capacity(plan.len());
        let mut wanted = plan.iter().peekable();
        for (i, a) in self.running.iter_mut().enumerate() {
            let Some(&&(pi, n)) = wanted.peek() else {
                break;
            };
            if pi != i {
                continue;
            }
            wanted.next();
            let start = a.state.len();
            let logits = if start + n == a.tokens.len() {
                Logits::Last
            } else {
                Logits::None
            };
            batch.push(BatchSeq {
                tokens: &a.tokens[start..start + n],
                state: &mut a.state,
                logits,
            });
        }
        self.session.loaded.model.forward_batch(&mut batch)
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason) -> anyhow::Result<()> {
        let Some(pos) = self.running.iter().position(|a| a.id == id) else {
            return Ok(());
        };
        let mut a = self.running.remove(pos);
        let (outputs, stopped) = a.output.finish(&self.session.loaded.tokenizer)?;
        let reason = if stopped {
            FinishReason::StopString
        } else {
            reason
        };
        if !outputs.is_empty() {
            a.emit(SeqEvent::Output {
                outputs,
                tokens: Vec::new(),
                logprobs: Vec::new(),
            });
        }
        if self.config.prefix_cache {
            self.prefix.insert(&a.state, &a.tokens);
        }
        a.stats.kv_cache_bytes = a.state.allocated_bytes();
        let stats = a.stats.clone();
        a.emit(SeqEvent::Finished { reason, stats });
        Ok(())
    }
}

/// Checks a request against the model and the engine's limits; returns the sequence's length
/// limit (its context).
pub fn validate(
    session: &ModelSession,
    config: &EngineConfig,
    request: &GenerationRequest,
) -> Result<usize, SubmitError> {
    if request.prompt.is_empty() {
        return Err(SubmitError::Invalid("the prompt is empty".into()));
    }
    let vocab = session.info().vocab_size;
    if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(SubmitError::Invalid(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let pool_tokens = blocks_for(config.kv_tokens.max(1)) * crate::state::BLOCK_TOKENS;
    let limit = request
        .context_limit
        .unwrap_or(session.context)
        .min(session.context)
        .min(pool_tokens);
    if request.prompt.len() >= limit {
        return Err(SubmitError::ContextExceeded {
            prompt: request.prompt.len(),
            limit,
        });
    }
    Ok(limit)
}

/// The token chosen for one sequence.
enum Pick {
    Token {
        token: u32,
        logprobs: Vec<TokenLogprob>,
    },
    /// The grammar allows nothing more than an end the request may not take yet (`min_tokens`):
    /// the answer is complete.
    GrammarEnd,
}

/// Whether `a` may end at an end-of-sequence token now.
fn eos_allowed(a: &Active) -> bool {
    !a.request.ignore_eos && a.generated() >= a.request.min_tokens
}

/// Chooses the next token of `a` from `logits` (penalties, sampling, the grammar mask) and
/// advances its grammar. Touches nothing but `a`, so sequences can choose in parallel.
/// With a grammar, the token is first sampled unconstrained and only checked (cheap); the
/// mask is computed when that token is not allowed (llama.cpp's fast path). The draw still
/// follows the masked distribution: an allowed token is kept with probability p, and a
/// rejected draw is redrawn from the masked, renormalized probabilities. With logprobs asked
/// for, the mask is always computed so the reported values are those of the masked
/// distribution.
fn choose(a: &mut Active, mut logits: Vec<f32>, tokenizer: &TextTokenizer) -> Result<Pick, String> {
    let eos_ok = eos_allowed(a);
    if !eos_ok {
        for &e in &tokenizer.eos_ids {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let t0 = Instant::now();
    let history = &a.tokens[a.prompt_len..];
    let mut grammar = std::time::Duration::ZERO;
    let token = match a.constraint.as_mut() {
        None => a.sampler.sample(&logits, history),
        Some(c) => {
            let grammar_error = |e: anyhow::Error| format!("the grammar constraint failed: {e:#}");
            let fast = if a.request.logprobs.is_none() {
                let t = a.sampler.sample(&logits, history);
                let g = Instant::now();
                let ok = c.allows(t).map_err(grammar_error)?;
                grammar += g.elapsed();
                ok.then_some(t)
            } else {
                None
            };
            match fast {
                Some(t) => t,
                None => {
                    let g = Instant::now();
                    let mask = c.mask().map_err(grammar_error)?;
                    let allowed = Constraint::apply(&mask, &mut logits);
                    grammar += g.elapsed();
                    a.stats.grammar_masks += 1;
                    if allowed == 0 {
                        a.stats.grammar_duration += grammar;
                        return Ok(Pick::GrammarEnd);
                    }
                    a.sampler.sample(&logits, history)
                }
            }
        }
    };
    let logprobs = match a.request.logprobs {
        Some(top) => vec![token_logprob(&logits, token, top)],
        None => Vec::new(),
    };
    if !(eos_ok && tokenizer.is_eos(token)) {
        if let Some(c) = a.constraint.as_mut() {
            let g = Instant::now();
            c.commit(token)
                .map_err(|e| format!("the grammar constraint failed: {e:#}"))?;
            grammar += g.elapsed();
        }
    }
    a.stats.grammar_duration += grammar;
    a.stats.eval_duration += t0.elapsed();
    Ok(Pick::Token { token, logprobs })
}

/// Emits the output of the token chosen for `a` and returns why the sequence ends, if it does.
fn emit_pick(
    a: &mut Active,
    pick: Pick,
    tokenizer: &TextTokenizer,
) -> anyhow::Result<Option<FinishReason>> {
    let (token, logprobs) = match pick {
        Pick::GrammarEnd => return Ok(Some(FinishReason::Stop)),
        Pick::Token { token, logprobs } => (token, logprobs),
    };
    if eos_allowed(a) && tokenizer.is_eos(token) {
        // The stop token is generated output (counted, reported with its log-probability, as
        // llama.cpp, Ollama and vLLM count it) but shows no text and is never fed back.
        a.stats.eval_count += 1;
        a.emit(SeqEvent::Output {
            outputs: Vec::new(),
            tokens: vec![token],
            logprobs,
        });
        return Ok(Some(FinishReason::Stop));
    }
    a.tokens.push(token);
    a.stats.eval_count += 1;
    let (outputs, finish) = a.output.push(tokenizer, token)?;
    a.emit(SeqEvent::Output {
        outputs,
        tokens: vec![token],
        logprobs,
    });
    if let Some(reason) = finish {
        return Ok(Some(reason));
    }
    if a.cancelled {
        return Ok(Some(FinishReason::Cancelled));
    }
    if a.constraint.as_ref().is_some_and(Constraint::is_finished) {
        // The grammar is complete and allows nothing after it.
        return Ok(Some(FinishReason::Stop));
    }
    if a.request.max_tokens.is_some_and(|m| a.generated() >= m) {
        return Ok(Some(FinishReason::Length));
    }
    if a.tokens.len() >= a.limit {
        return Ok(Some(FinishReason::ContextFull));
    }
    Ok(None)
}

/// Log-softmax of `token` and the `top` most likely tokens.
fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let norm = max + sum.ln();
    let lp = |i: usize| (logits[i] as f64 - norm) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        best = idx.into_iter().map(|i| (i as u32, lp(i))).collect();
    }
    TokenLogprob {
        token,
        logprob: lp(token as usize),
        top: best,
    }
}

/// Collects a request's events (for callers that want the whole answer at once, and tests).
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<(String, String)>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub cached_tokens: usize,
    pub finish: Option<FinishReason>,
    pub stats: GenerationStats,
    pub error: Option<String>,
}

impl Collected {
    /// Adds one event.
    pub fn push(&mut self, event: SeqEvent) {
        match event {
            SeqEvent::Started { cached_tokens, .. } => self.cached_tokens = cached_tokens,
            SeqEvent::Output {
                outputs,
                tokens,
                logprobs,
            } => {
                self.tokens.extend(tokens);
                self.logprobs.extend(logprobs);
                for o in outputs {
                    match o {
                        Output::Text(t) => self.text.push_str(&t),
                        Output::Reasoning(t) => self.reasoning.push_str(&t),
                        Output::ToolCall { name, arguments } => {
                            self.tool_calls.push((name, arguments))
                        }
                    }
                }
            }
            SeqEvent::Finished { reason, stats } => {
                self.finish = Some(reason);
                self.stats = stats;
            }
            SeqEvent::Failed(e) => self.error = Some(e),
        }
    }
}

/// A sink that collects into a shared [`Collected`].
pub fn collecting_sink() -> (EventSink, Arc<std::sync::Mutex<Collected>>) {
    let shared = Arc::new(std::sync::Mutex::new(Collected::default()));
    let s = shared.clone();
    let sink: EventSink = Box::new(move |event| {
        s.lock().unwrap_or_else(|e| e.into_inner()).push(event);
        true
    });
    (sink, shared)
}
