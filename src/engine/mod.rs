//! Generation: tokenizer + chat template → prefill → decode loop with KV cache, sampling, stop
//! conditions, streaming callback and cancellation. Drivable step by step (no stdout here).

pub mod chat_template;
pub mod embed;
pub mod generate;
mod gguf_tokenizer;
pub mod harmony;
pub mod harmony_chat;
pub mod kv_cache;
pub mod kv_quant;
pub mod load;
pub mod memory_plan;
pub mod preflight;
pub mod sampler;
pub mod tokenizer;
pub mod tokenizer_checks;
