//! `xllm tokenize MODEL TEXT`: the token ids of a text and the piece of text each stands for,
//! as `llama-tokenize` prints them (`<id> -> '<piece>'`), or as JSON. Only the tokenizer is
//! loaded, not the weights.

use super::TokenizeArgs;
use crate::engine::load::load_tokenizer;
use crate::store::resolve_for_run as resolve;

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let resolved = resolve(&args.model)?;
    let tokenizer = load_tokenizer(&resolved)?;
    let ids = tokenizer.encode(&args.text, !args.no_bos)?;
    let pieces = ids
        .iter()
        .map(|&id| tokenizer.piece(id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = if args.json {
        let json = serde_json::json!({
            "model": resolved.display_name,
            "ids": ids,
            "pieces": pieces,
        });
        format!("{}\n", serde_json::to_string(&json)?)
    } else {
        ids.iter()
            .zip(&pieces)
            .map(|(id, piece)| format!("{id:>6} -> '{piece}'\n"))
            .collect()
    };
    super::output::print_stdout(&out)
}
