//! Process exit codes. Typed errors that deserve their own status are found by downcasting the
//! `anyhow::Error` chain, so every layer can keep using `anyhow` with context.

use crate::quant::QuantError;

/// Generic failure (I/O, network, bad model file, ...).
pub const EXIT_FAILURE: u8 = 1;
/// Command-line usage error (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// `invalid quantization` or `unsupported quantization` (also `xllm quantize --type` naming an
/// unknown type, or one that cannot hold a tensor): distinct so scripts can tell them apart.
pub const EXIT_QUANTIZATION: u8 = 3;
/// The model is not in the store (or not complete) and nothing was asked to fetch it.
pub const EXIT_NOT_FOUND: u8 = 4;

/// Raised when a model name does not resolve to a complete model in the store.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NotFound {
    pub message: String,
}

/// The exit code for an error: the first typed error found in its chain decides.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<QuantError>().is_some()
            || cause
                .downcast_ref::<crate::quantize::types::UnknownType>()
                .is_some()
            || cause
                .downcast_ref::<crate::quantize::plan::CannotHold>()
                .is_some()
        {
            return EXIT_QUANTIZATION;
        }
        if cause.downcast_ref::<NotFound>().is_some() {
            return EXIT_NOT_FOUND;
        }
    }
    EXIT_FAILURE
}
