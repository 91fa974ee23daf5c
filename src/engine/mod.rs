//! The engine: one way to open a model ([`session`]), and a continuous-batching [`scheduler`]
//! that advances many sequences per forward pass with per-sequence sampling, stops and output
//! processing ([`postprocess`]: stop strings held back, harmony channels, `<think>` reasoning, tool
//! calls) and grammar constraints ([`structured`]). Nothing here prints;
//! every event of a request goes to its sink.

pub mod chat_template;
pub mod embed;
pub mod embed_worker;
pub mod generate;
mod gguf_tokenizer;
pub mod harmony;
pub mod load;
pub mod memory_plan;
pub mod postprocess;
mod prefix_cache;
pub mod preflight;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod session;
pub mod structured;
pub mod think;
pub mod threads;
pub mod tokenizer;
pub mod tokenizer_checks;
pub mod tools;
pub mod worker;
