//! Command-line interface: clap definitions and dispatch. No model logic lives here; each command
//! has its own module that renders what the library computes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod bench;
pub mod completions;
pub mod embed;
pub mod imatrix;
pub mod list;
pub mod output;
pub mod perplexity;
pub mod pull;
pub mod quantize;
pub mod rm;
pub mod run;
pub mod serve;
pub mod show;
pub mod tokenize;
pub mod turn_view;

/// Run open-weight LLMs from the Hugging Face Hub, straight from safetensors or GGUF.
#[derive(Debug, Parser)]
#[command(name = "xllm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download a model from the Hugging Face Hub into the store (resumable, verified).
    Pull(PullArgs),
    /// List the models in the store.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show a model's architecture, parameters, quantization and files.
    Show(ShowArgs),
    /// Remove models from the store (partial downloads included).
    Rm(RmArgs),
    /// Chat with a model (REPL), or answer one prompt and exit.
    Run(RunArgs),
    /// Serve models over HTTP: OpenAI- and Ollama-compatible APIs on the batching engine.
    Serve(ServeArgs),
    /// Measure perplexity of a model on a text file.
    Perplexity(PerplexityArgs),
    /// Measure prefill and decode speed (tokens/s).
    Bench(BenchArgs),
    /// Quantize a model (safetensors or GGUF) into a GGUF file, one tensor at a time.
    Quantize(QuantizeArgs),
    /// Importance matrix for low-bit quantization: input activation statistics of every matmul
    /// weight on calibration text (llama.cpp's GGUF imatrix format, or legacy .dat).
    Imatrix(ImatrixArgs),
    /// Embedding vectors for texts (arguments, --file lines or stdin lines).
    Embed(EmbedArgs),
    /// Print the token ids and pieces of a text (like llama-tokenize).
    Tokenize(TokenizeArgs),
    /// Print shell completions.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Model: `org/name`, or `org/name-GGUF:Q4_K_M` to pick a GGUF file.
    pub model: String,
    /// Branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Model name (with optional `:quantization`), local directory or .gguf file.
    pub model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Models to remove.
    #[arg(required = true)]
    pub models: Vec<String>,
}

/// Where to run.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Device: `cpu`, `cuda`, `cuda:N` or `metal` (default: the best available).
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Context length to allocate (default: the model's, capped for memory).
    #[arg(long)]
    pub ctx: Option<usize>,
}

/// How tokens are chosen.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub min_p: Option<f64>,
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Tokens considered by the repeat penalty.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Random seed (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Structured output: the answer is constrained to one of these (at most one).
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// Answer with one JSON object (any keys). (`--format json` is this command's JSON
    /// envelope for the answer, not a constraint.)
    #[arg(long)]
    pub json_object: bool,
    /// Answer with JSON that validates against the JSON Schema in FILE; unsupported schema
    /// keywords are refused by name.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Answer in the grammar in FILE (llguidance's Lark syntax: `start: ...`, `%json {..}`).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// Answer with text that matches this regular expression (Rust regex syntax).
    #[arg(long, value_name = "REGEX")]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReasoningEffort {
    Low,
    Medium,
    High,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model name (with optional `:quantization`), local directory or .gguf file.
    pub model: String,
    /// Prompt for a one-shot answer; without it (and with a terminal on stdin) a chat starts.
    pub prompt: Option<String>,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Output format of a one-shot answer.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Print timing statistics to stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Maximum tokens to generate.
    #[arg(long, short = 'n')]
    pub max_tokens: Option<usize>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Hide the reasoning (gpt-oss's "analysis" channel, `<think>` text) and show only the answer.
    #[arg(long)]
    pub hide_thinking: bool,
    /// `<think>` models (Nemotron): reason before answering (the template's `enable_thinking`;
    /// on by default in Nemotron's template).
    #[arg(long, overrides_with = "no_think")]
    pub think: bool,
    /// `<think>` models: answer without reasoning (`enable_thinking` false).
    #[arg(long, overrides_with = "think")]
    pub no_think: bool,
    /// gpt-oss: reasoning effort.
    #[arg(long, value_enum)]
    pub reasoning_effort: Option<ReasoningEffort>,
    #[command(flatten)]
    pub constraint: ConstraintArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (`XLLM_HOST` may also give `host:port`).
    #[arg(long, env = "XLLM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is logged).
    #[arg(long, env = "XLLM_PORT", default_value_t = 11434)]
    pub port: u16,
    /// A local model to serve: `PATH` (named after the file or folder) or `NAME=PATH`
    /// (repeatable). Store models are served by name without this.
    #[arg(long = "model", value_name = "PATH|NAME=PATH")]
    pub models: Vec<String>,
    /// Load these models (names as clients use them) before reporting ready.
    #[arg(long, value_name = "NAME")]
    pub preload: Vec<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "XLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How long a model stays loaded after its last request (`5m`, `1h`, `0`, `-1` = forever).
    #[arg(long, env = "XLLM_KEEP_ALIVE", default_value = "5m")]
    pub keep_alive: String,
    /// Sequences each model runs at once (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Requests that may wait per model before new ones are refused with 503.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Models loaded at once (the least recently used idle one is unloaded first).
    #[arg(long, default_value_t = 3)]
    pub max_models: usize,
    /// Memory all loaded models may use together, e.g. `8GB` (default: what is free).
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Allow browsers on these origins (CORS; `*` for any). Off by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Largest request body, e.g. `8MB`.
    #[arg(long, default_value = "8MB")]
    pub body_limit: String,
    /// After SIGTERM, how long running requests may finish before they are cancelled.
    #[arg(long, default_value = "30s")]
    pub shutdown_timeout: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Model name, local directory or .gguf file.
    pub model: String,
    /// Text file to score.
    #[arg(long, short)]
    pub file: PathBuf,
    /// Prepend the BOS token.
    #[arg(long)]
    pub add_bos: bool,
    /// Score as llama.cpp's `llama-perplexity` does, for comparable numbers: chunks of `--ctx`
    /// tokens (default 512) of the text tokenized with BOS, each chunk starting with BOS, only
    /// the second half of each chunk scored.
    #[arg(long, conflicts_with = "add_bos")]
    pub llama_cpp: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model name (with optional `:quantization`), local directory or .gguf file.
    pub model: String,
    /// Text to tokenize.
    pub text: String,
    /// Do not add what the model adds to a raw prompt (BOS).
    #[arg(long)]
    pub no_bos: bool,
    /// Print JSON (`ids` and `pieces`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model name, local directory or .gguf file.
    pub model: String,
    /// Prompt tokens to prefill.
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
    pub gen_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repeats: usize,
    /// Run N sequences at once through the continuous-batching scheduler and report aggregate
    /// and per-sequence decode speed and time to first token.
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Decode under a grammar (runs through the scheduler, like `--parallel`): compare with
    /// the same command without it for the cost of constrained decoding.
    #[command(flatten)]
    pub constraint: ConstraintArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmbedFormat {
    /// One JSON array of numbers per input, one per line.
    Text,
    /// One JSON object per line: index, tokens, embedding.
    Jsonl,
    /// One JSON document with every vector.
    Json,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Embedding model: name, local directory (sentence-transformers folder or BERT checkpoint).
    pub model: String,
    /// Texts to embed; without them, lines of --file or of stdin.
    pub texts: Vec<String>,
    /// Read inputs from this file, one per non-empty line (`-` for stdin).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EmbedFormat::Text)]
    pub format: EmbedFormat,
    /// Same as --format json.
    #[arg(long)]
    pub json: bool,
    /// Keep the first N dimensions (Matryoshka), renormalised when the model normalises.
    #[arg(long)]
    pub dimensions: Option<usize>,
    /// Refuse inputs longer than the model's limit instead of truncating them.
    #[arg(long)]
    pub no_truncate: bool,
    /// Print load and embed durations, token count and rate to stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// Device: only `cpu` runs embedding models for now.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Model to quantize: a store model, a safetensors folder, a .gguf file or an Ollama blob.
    pub source: String,
    /// Target type: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M,
    /// Q6_K, TQ1_0, TQ2_0 (Q3_K, Q4_K, Q5_K mean their _M mix).
    #[arg(long = "type", short = 't')]
    pub ty: String,
    /// Output file (default: `<source>-<TYPE>.gguf` in the current folder).
    #[arg(long, short, conflicts_with = "name")]
    pub output: Option<PathBuf>,
    /// Add the result to the store under this name instead of writing a file.
    #[arg(long)]
    pub name: Option<String>,
    /// Print the plan (tensor, role, shape, types, bytes) and the output size; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print the plan as JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// How TQ1_0/TQ2_0 blocks are scaled: absmax (llama.cpp's block absmax, the default) or
    /// absmean-channel (BitNet b1.58: mean |w| of each output row).
    #[arg(long, default_value = "absmax", value_parser = ["absmax", "absmean-channel"])]
    pub ternary_scale: String,
    /// With --dry-run: quantize in memory and print each tensor's reconstruction error
    /// (‖w − ŵ‖ / ‖w‖; for TQ1_0/TQ2_0 under both ternary scales).
    #[arg(long, requires = "dry_run")]
    pub stats: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Importance matrix (`xllm imatrix` or `llama-imatrix` output, GGUF or legacy .dat): weighs
    /// the rounding error of Q2_K..Q6_K and Q4_0..Q5_1 as llama-quantize does.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImatrixArgs {
    /// Model name, local directory or .gguf file (the unquantized model is best).
    pub model: String,
    /// Calibration text (default: calibration.txt in the model's folder, else xllm's built-in
    /// text).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Use at most this many chunks of the text (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Tokens per chunk (llama-imatrix's -c).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Output file: llama.cpp's GGUF imatrix format, or the legacy format when it ends in .dat.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Recompute even when a cached result for this model and text exists.
    #[arg(long)]
    pub no_cache: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pull(a) => pull::run(a),
        Command::List(a) => list::run(a),
        Command::Show(a) => show::run(a),
        Command::Rm(a) => rm::run(a),
        Command::Run(a) => run::with_thread_pool(a.runtime.threads, || run::run(a)),
        Command::Serve(a) => serve::run(a),
        Command::Perplexity(a) => run::with_thread_pool(a.runtime.threads, || perplexity::run(a)),
        Command::Bench(a) => run::with_thread_pool(a.runtime.threads, || bench::run(a)),
        Command::Quantize(a) => run::with_thread_pool(a.threads, || quantize::run(a)),
        Command::Imatrix(a) => run::with_thread_pool(a.threads, || imatrix::run(a)),
        Command::Embed(a) => run::with_thread_pool(a.threads, || embed::run(a)),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Completions(a) => completions::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:#}");
            ExitCode::from(crate::error::exit_code_for(&err))
        }
    }
}
