//! A model file: a GGUF file (`gguf`) together with the architecture that
//! runs it (`models`), and what the node needs to know before loading any
//! weights: the hyper-parameters, the byte accounting per layer, embedding
//! and head that placement needs, the fingerprint, the tokenizer and the
//! chat template. Loading a shard reads only that shard's tensors.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::architecture::Architecture;
use crate::chat_template::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{KernelError, Result};
use crate::gguf::GgufFile;
use crate::layers::LayerRange;
use crate::models;
use crate::shard::Shard;
use crate::tensor_names::{OUTPUT, OUTPUT_NORM, ROPE_FREQS, TOKEN_EMBEDDING};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// An opened model file. Holds the GGUF header, never tensor data.
#[derive(Debug)]
pub struct ModelFile {
    gguf: GgufFile,
    architecture: &'static dyn Architecture,
    config: ModelConfig,
}

impl ModelFile {
    /// Reads the header of the GGUF file at `path` and checks that it is a
    /// model ringlet can run: a known architecture, and every tensor it
    /// needs present and inside the file.
    /// The first part of a split model brings the others, found beside it
    /// by name.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(GgufFile::open(path.as_ref())?)
    }

    /// Like [`open`](Self::open), for a model split in parts whose paths
    /// are given in order (one path: an unsplit file).
    pub fn open_parts(paths: &[PathBuf]) -> Result<Self> {
        Self::from_gguf(GgufFile::open_parts(paths)?)
    }

    fn from_gguf(gguf: GgufFile) -> Result<Self> {
        let (architecture, config) = models::for_metadata(gguf.metadata())?;
        let model = Self {
            gguf,
            architecture,
            config,
        };
        model.check_tensor_directory()?;
        Ok(model)
    }

    /// The file's path (the first part's, when split).
    pub fn path(&self) -> &Path {
        self.gguf.path()
    }

    /// The files the model is stored in: 1 unless split.
    pub fn part_count(&self) -> usize {
        self.gguf.part_count()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `sha256:<hex>` over the file's header (metadata and tensor directory:
    /// names, types, shapes, offsets) and its length. Two files with the same
    /// fingerprint have the same architecture, tokenizer, quantization and
    /// layout; it is cheap to compute for files of any size.
    pub fn fingerprint(&self) -> &str {
        self.gguf.fingerprint()
    }

    /// The `general.name` of the model, when the file has one.
    pub fn display_name(&self) -> Option<&str> {
        self.gguf
            .metadata()
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// Bytes of one tensor's data as stored in the file.
    pub fn tensor_bytes(&self, name: &str) -> Result<u64> {
        self.gguf.tensor_bytes(name)
    }

    /// Weight bytes of each transformer layer, in layer order.
    pub fn layer_weight_bytes(&self) -> Result<Vec<u64>> {
        (0..self.config.n_layers)
            .map(|layer| {
                self.architecture
                    .layer_tensors(layer)
                    .iter()
                    .map(|name| self.tensor_bytes(name))
                    .sum()
            })
            .collect()
    }

    /// Bytes held by the first shard only: the token embedding.
    pub fn embedding_bytes(&self) -> Result<u64> {
        self.tensor_bytes(TOKEN_EMBEDDING)
    }

    /// Bytes held by the last shard only: the output norm and the output
    /// projection (the token embedding again when the model ties them).
    pub fn head_bytes(&self) -> Result<u64> {
        let norm = self.tensor_bytes(OUTPUT_NORM)?;
        let output = if self.ties_embeddings() {
            self.embedding_bytes()?
        } else {
            self.tensor_bytes(OUTPUT)?
        };
        Ok(norm + output)
    }

    /// True when the output projection reuses the token embedding.
    pub fn ties_embeddings(&self) -> bool {
        !self.gguf.has_tensor(OUTPUT)
    }

    /// The tensors a shard of `range` reads: its layers', plus the
    /// embedding for the first shard and the output norm and head for the
    /// last (the embedding again when tied), each once.
    pub fn shard_tensors(&self, range: LayerRange) -> Result<Vec<String>> {
        self.check_range(range)?;
        let mut names: Vec<String> = (range.start..range.end)
            .flat_map(|layer| self.architecture.layer_tensors(layer))
            .collect();
        let first = range.is_first();
        if first {
            names.push(TOKEN_EMBEDDING.to_string());
        }
        if range.is_last(self.config.n_layers) {
            names.push(OUTPUT_NORM.to_string());
            if !self.ties_embeddings() {
                names.push(OUTPUT.to_string());
            } else if !first {
                names.push(TOKEN_EMBEDDING.to_string());
            }
        }
        if self.gguf.has_tensor(ROPE_FREQS) {
            names.push(ROPE_FREQS.to_string());
        }
        Ok(names)
    }

    /// The weight bytes a shard of `range` holds once loaded.
    pub fn shard_weight_bytes(&self, range: LayerRange) -> Result<u64> {
        self.shard_tensors(range)?
            .iter()
            .map(|name| self.tensor_bytes(name))
            .sum()
    }

    /// Where the data of a shard's tensors lie: for each part of the
    /// model (one list for an unsplit file), `[start, end)` byte ranges in
    /// file order, adjacent tensors joined. What a node must have on disk
    /// to load the shard.
    pub fn shard_byte_ranges(&self, range: LayerRange) -> Result<Vec<Vec<Range<u64>>>> {
        let mut by_part: Vec<Vec<Range<u64>>> = vec![Vec::new(); self.part_count()];
        for name in self.shard_tensors(range)? {
            let (part, extent) = self.gguf.tensor_extent(&name)?;
            by_part[part].push(extent);
        }
        for extents in &mut by_part {
            extents.sort_by_key(|extent| extent.start);
            let mut joined: Vec<Range<u64>> = Vec::with_capacity(extents.len());
            for extent in extents.drain(..) {
                match joined.last_mut() {
                    Some(last) if extent.start <= last.end => last.end = last.end.max(extent.end),
                    _ => joined.push(extent),
                }
            }
            *extents = joined;
        }
        Ok(by_part)
    }

    fn check_range(&self, range: LayerRange) -> Result<()> {
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
        let weights = Weights::new(self.gguf.reader(device)?);
        Shard::load(
            weights,
            self.architecture,
            self.config.clone(),
            range,
            self.ties_embeddings(),
        )
    }

    /// The tokenizer described by the file's `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_gguf_metadata(self.gguf.metadata())
    }

    /// The chat template from `tokenizer.chat_template`; when the file
    /// carries none, its family's own (Gemma's turns), else ChatML.
    pub fn chat_template(&self, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let source = self
            .gguf
            .metadata()
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .or_else(|| self.architecture.default_chat_template().map(String::from));
        ChatTemplate::new(source, tokenizer.bos_text(), tokenizer.eos_text())
    }

    /// Checks every tensor the model needs: present, whole blocks, inside
    /// the file.
    fn check_tensor_directory(&self) -> Result<()> {
        let mut names = vec![TOKEN_EMBEDDING.to_string(), OUTPUT_NORM.to_string()];
        for layer in 0..self.config.n_layers {
            names.extend(self.architecture.layer_tensors(layer));
        }
        for optional in [OUTPUT, ROPE_FREQS] {
            if self.gguf.has_tensor(optional) {
                names.push(optional.to_string());
            }
        }
        names
            .iter()
            .try_for_each(|name| self.gguf.check_tensor(name))
    }
}
