//! The model families ringlet runs, one file each, chosen by the file's
//! `general.architecture`. To add one: a file here implementing
//! [`Architecture`] and [`Layer`](crate::architecture::Layer) over the
//! shared blocks, and its line in [`ARCHITECTURES`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::architecture::Architecture;
use crate::config::ModelConfig;
use crate::error::{KernelError, Result};
use crate::gguf::get_string;

mod llama;

/// Every architecture ringlet runs.
static ARCHITECTURES: [&dyn Architecture; 1] = [&llama::Llama];

/// The architecture that runs the model described by `metadata`, and the
/// model's hyper-parameters as that architecture reads them.
pub(crate) fn for_metadata(
    metadata: &HashMap<String, Value>,
) -> Result<(&'static dyn Architecture, ModelConfig)> {
    let architecture = get_string(metadata, "general.architecture")?;
    let Some(&family) = ARCHITECTURES
        .iter()
        .find(|a| a.names().contains(&architecture.as_str()))
    else {
        return Err(KernelError::UnsupportedArchitecture { architecture });
    };
    let config = family.config(metadata, architecture)?;
    Ok((family, config))
}
