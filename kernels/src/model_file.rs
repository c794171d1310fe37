//! A GGUF model file: its metadata, its tensor directory, and the byte
//! accounting that placement needs. Tensor data is read only when a shard
//! asks for it, so a node never touches the weights of layers it does not
//! hold.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::quantized::{GgmlDType, QTensor};
use sha2::{Digest, Sha256};

use crate::chat_template::ChatTemplate;
use crate::error::{KernelError, Result};
use crate::layers::LayerRange;
use crate::llama::{LlamaConfig, Shard};
use crate::tokenizer::Tokenizer;

/// An opened GGUF file. Holds the header (metadata and tensor directory),
/// never tensor data.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    content: Content,
    config: LlamaConfig,
    file_size: u64,
    fingerprint: String,
}

impl ModelFile {
    /// Reads the header of the GGUF file at `path` and checks that it is a
    /// model ringlet can run.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_error = |source| KernelError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_error)?;
        let file_size = file.metadata().map_err(io_error)?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| KernelError::NotGguf {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let fingerprint = fingerprint_header(&mut reader, content.tensor_data_offset, file_size)
            .map_err(io_error)?;
        let config = LlamaConfig::from_metadata(&content.metadata)?;
        let model = Self {
            path,
            content,
            config,
            file_size,
            fingerprint,
        };
        model.check_tensor_directory()?;
        Ok(model)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// `sha256:<hex>` over the file's header (metadata and tensor directory:
    /// names, types, shapes, offsets) and its length. Two files with the same
    /// fingerprint have the same architecture, tokenizer, quantization and
    /// layout; it is cheap to compute for files of any size.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The `general.name` of the model, when the file has one.
    pub fn display_name(&self) -> Option<&str> {
        self.content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| KernelError::MissingTensor {
                name: name.to_string(),
            })
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Bytes of one tensor's data as stored in the file.
    pub fn tensor_bytes(&self, name: &str) -> Result<u64> {
        let info = self.tensor_info(name)?;
        let dtype = info.ggml_dtype;
        // Dimensions come from the file: multiply without overflowing.
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        elements
            .map(|n| n / dtype.block_size() as u64)
            .and_then(|blocks| blocks.checked_mul(dtype.type_size() as u64))
            .ok_or_else(|| KernelError::NotGguf {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{name}` has an impossible size {:?}",
                    info.shape.dims()
                ),
            })
    }

    /// Weight bytes of each transformer layer, in layer order.
    pub fn layer_weight_bytes(&self) -> Result<Vec<u64>> {
        (0..self.config.n_layers)
            .map(|layer| {
                crate::llama::block_tensor_names(layer)
                    .iter()
                    .map(|name| self.tensor_bytes(name))
                    .sum()
            })
            .collect()
    }

    /// Bytes held by the first shard only: the token embedding.
    pub fn embedding_bytes(&self) -> Result<u64> {
        self.tensor_bytes(crate::llama::TOKEN_EMBEDDING)
    }

    /// Bytes held by the last shard only: the output norm and the output
    /// projection (the token embedding again when the model ties them).
    pub fn head_bytes(&self) -> Result<u64> {
        let norm = self.tensor_bytes(crate::llama::OUTPUT_NORM)?;
        let output = if self.has_tensor(crate::llama::OUTPUT) {
            self.tensor_bytes(crate::llama::OUTPUT)?
        } else {
            self.embedding_bytes()?
        };
        Ok(norm + output)
    }

    /// True when the output projection reuses the token embedding.
    pub fn ties_embeddings(&self) -> bool {
        !self.has_tensor(crate::llama::OUTPUT)
    }

    /// The weight bytes a shard of `range` holds once loaded.
    pub fn shard_weight_bytes(&self, range: LayerRange) -> Result<u64> {
        self.check_range(range)?;
        let layers = self.layer_weight_bytes()?;
        let mut bytes: u64 = layers[range.start..range.end].iter().sum();
        let first = range.is_first();
        let last = range.is_last(self.config.n_layers);
        if first {
            bytes += self.embedding_bytes()?;
        }
        if last {
            bytes += self.tensor_bytes(crate::llama::OUTPUT_NORM)?;
            if !self.ties_embeddings() {
                bytes += self.tensor_bytes(crate::llama::OUTPUT)?;
            } else if !first {
                bytes += self.embedding_bytes()?;
            }
        }
        if self.has_tensor(crate::llama::ROPE_FREQS) {
            bytes += self.tensor_bytes(crate::llama::ROPE_FREQS)?;
        }
        Ok(bytes)
    }

    pub(crate) fn check_range(&self, range: LayerRange) -> Result<()> {
        if range.is_empty() || range.end > self.config.n_layers {
            return Err(KernelError::LayerRangeOutOfBounds {
                range,
                n_layers: self.config.n_layers,
            });
        }
        Ok(())
    }

    /// Loads the layers `range` onto `device`: only the tensors of those
    /// layers, plus the embedding for the first shard and the head for the
    /// last, are read from disk.
    pub fn load_shard(&self, range: LayerRange, device: &Device) -> Result<Shard> {
        self.check_range(range)?;
        let file = File::open(&self.path).map_err(|source| KernelError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut reader = TensorReader {
            model: self,
            reader: BufReader::new(file),
            device: device.clone(),
        };
        Shard::load(&mut reader, range)
    }

    /// The tokenizer described by the file's `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_gguf_metadata(&self.content.metadata)
    }

    /// The chat template from `tokenizer.chat_template`, or ChatML when the
    /// file carries none.
    pub fn chat_template(&self, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let source = self
            .content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        ChatTemplate::new(source, tokenizer.bos_text(), tokenizer.eos_text())
    }

    fn check_tensor_directory(&self) -> Result<()> {
        let mut names = vec![
            crate::llama::TOKEN_EMBEDDING.to_string(),
            crate::llama::OUTPUT_NORM.to_string(),
        ];
        for layer in 0..self.config.n_layers {
            names.extend(crate::llama::block_tensor_names(layer));
        }
        for optional in [crate::llama::OUTPUT, crate::llama::ROPE_FREQS] {
            if self.has_tensor(optional) {
                names.push(optional.to_string());
            }
        }
        for name in &names {
            let info = self.tensor_info(name)?;
            let block = info.ggml_dtype.block_size();
            if info.shape.elem_count() % block != 0 {
                return Err(KernelError::NotGguf {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor `{name}` has {} elements, not a multiple of its block size {block}",
                        info.shape.elem_count()
                    ),
                });
            }
            let end = self
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(self.tensor_bytes(name).ok()?))
                .unwrap_or(u64::MAX);
            if end > self.file_size {
                return Err(KernelError::NotGguf {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor `{name}` ends at byte {end} but the file has {} bytes (truncated download?)",
                        self.file_size
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Reads individual tensors of one model file onto one device.
pub(crate) struct TensorReader<'a> {
    pub(crate) model: &'a ModelFile,
    reader: BufReader<File>,
    pub(crate) device: Device,
}

impl TensorReader<'_> {
    /// The tensor's format, shape (Candle order: outermost first) and its
    /// bytes exactly as stored.
    pub(crate) fn read_raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let info = self.model.tensor_info(name)?;
        let bytes = self.model.tensor_bytes(name)? as usize;
        let start = self.model.content.tensor_data_offset + info.offset;
        let io_error = |source| KernelError::Io {
            path: self.model.path.clone(),
            source,
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(io_error)?;
        let mut data = vec![0u8; bytes];
        self.reader.read_exact(&mut data).map_err(io_error)?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec(), data))
    }

    pub(crate) fn dtype(&self, name: &str) -> Result<GgmlDType> {
        Ok(self.model.tensor_info(name)?.ggml_dtype)
    }

    pub(crate) fn read(&mut self, name: &str) -> Result<QTensor> {
        let info = self.model.tensor_info(name)?;
        Ok(info.read(
            &mut self.reader,
            self.model.content.tensor_data_offset,
            &self.device,
        )?)
    }
}

fn fingerprint_header(
    reader: &mut BufReader<File>,
    header_len: u64,
    file_size: u64,
) -> std::io::Result<String> {
    reader.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    hasher.update(file_size.to_le_bytes());
    let mut remaining = header_len;
    let mut buf = vec![0u8; 1 << 16];
    while remaining > 0 {
        let take = remaining.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..take])?;
        hasher.update(&buf[..take]);
        remaining -= take as u64;
    }
    Ok(format!("sha256:{}", crate::to_hex(&hasher.finalize())))
}
