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

mod gemma3;
mod llama;
mod qwen2;
mod qwen3;

/// Every architecture ringlet runs.
static ARCHITECTURES: [&dyn Architecture; 4] =
    [&llama::LLAMA, &qwen2::QWEN2, &qwen3::QWEN3, &gemma3::Gemma3];

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
        let supported = ARCHITECTURES
            .iter()
            .flat_map(|a| a.names())
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        return Err(KernelError::UnsupportedArchitecture {
            architecture,
            supported,
        });
    };
    let config = family.config(metadata, architecture)?;
    Ok((family, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_architecture_is_refused_by_name_with_the_supported_ones() {
        let metadata = HashMap::from([(
            "general.architecture".to_string(),
            Value::String("phi3".to_string()),
        )]);
        let error = for_metadata(&metadata).expect_err("phi3 is not supported");
        let message = error.to_string();
        assert!(message.contains("`phi3` is not supported"), "{message}");
        for name in ["llama", "mistral", "qwen2", "qwen3", "gemma3"] {
            assert!(message.contains(name), "{message} lists {name}");
        }
    }
}
