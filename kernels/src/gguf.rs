//! A GGUF file as a container: its header (metadata and tensor directory),
//! typed reads of metadata keys, each tensor's size, and a tensor's bytes
//! on request. Tensors are known only by name: which names a model needs
//! and what they mean is the architectures' business (`models`), so this
//! module knows none. Tensor data is read only when a shard asks for it,
//! so a node never touches the weights of layers it does not hold.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use sha2::{Digest, Sha256};

use crate::error::{KernelError, Result};

/// An opened GGUF file. Holds the header, never tensor data.
#[derive(Debug)]
pub(crate) struct GgufFile {
    path: PathBuf,
    content: Content,
    file_size: u64,
    fingerprint: String,
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
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
        Ok(Self {
            path,
            content,
            file_size,
            fingerprint,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `sha256:<hex>` over the header and the file's length (see
    /// `ModelFile::fingerprint`).
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| KernelError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Where tensor `name`'s data lies in the file: `[start, end)`.
    pub(crate) fn tensor_extent(&self, name: &str) -> Result<Range<u64>> {
        let info = self.tensor_info(name)?;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        start
            .and_then(|start| Some(start..start.checked_add(self.tensor_bytes(name).ok()?)?))
            .ok_or_else(|| KernelError::NotGguf {
                path: self.path.clone(),
                reason: format!("tensor `{name}` lies past any possible file end"),
            })
    }

    /// Bytes before the tensor data: the metadata and the tensor directory.
    pub(crate) fn header_len(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// Bytes of one tensor's data as stored in the file.
    pub(crate) fn tensor_bytes(&self, name: &str) -> Result<u64> {
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

    /// Checks that tensor `name` exists, fills whole blocks of its format,
    /// and lies inside the file (a truncated download fails here, at open,
    /// rather than mid-load).
    pub(crate) fn check_tensor(&self, name: &str) -> Result<()> {
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
        Ok(())
    }

    /// A reader of this file's tensors onto `device`.
    pub(crate) fn reader(&self, device: &Device) -> Result<TensorReader<'_>> {
        let file = File::open(&self.path).map_err(|source| KernelError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(TensorReader {
            file: self,
            reader: BufReader::new(file),
            device: device.clone(),
        })
    }
}

/// Reads individual tensors of one GGUF file onto one device.
pub(crate) struct TensorReader<'a> {
    file: &'a GgufFile,
    reader: BufReader<File>,
    device: Device,
}

impl TensorReader<'_> {
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }

    /// The tensor's format, shape (Candle order: outermost first) and its
    /// bytes exactly as stored.
    pub(crate) fn read_raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let info = self.file.tensor_info(name)?;
        let bytes = self.file.tensor_bytes(name)? as usize;
        let start = self.file.content.tensor_data_offset + info.offset;
        let io_error = |source| KernelError::Io {
            path: self.file.path.clone(),
            source,
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(io_error)?;
        let mut data = vec![0u8; bytes];
        self.reader.read_exact(&mut data).map_err(io_error)?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec(), data))
    }

    pub(crate) fn dtype(&self, name: &str) -> Result<GgmlDType> {
        Ok(self.file.tensor_info(name)?.ggml_dtype)
    }

    pub(crate) fn read(&mut self, name: &str) -> Result<QTensor> {
        let info = self.file.tensor_info(name)?;
        Ok(info.read(
            &mut self.reader,
            self.file.content.tensor_data_offset,
            &self.device,
        )?)
    }
}

/// The length of the GGUF header (metadata and tensor directory, up to the
/// aligned start of the tensor data) when `prefix`, the first bytes of a
/// file, holds all of it; `None` when it is cut short. A downloader reads
/// the header in growing pieces with this before it knows its length.
pub fn header_len_in(prefix: &[u8]) -> Option<u64> {
    let mut cursor = std::io::Cursor::new(prefix);
    let content = Content::read(&mut cursor).ok()?;
    // `Content::read` does not read the alignment padding; the header is
    // whole only when the prefix reaches the data.
    (content.tensor_data_offset <= prefix.len() as u64).then_some(content.tensor_data_offset)
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
    Ok(format!("sha256:{}", to_hex(&hasher.finalize())))
}

/// Lowercase hexadecimal of `bytes`: the form of the model fingerprint,
/// public so that the node writes its other digests (downloads, policy
/// files) the same way.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Typed reads of metadata; each error names the key
// ---------------------------------------------------------------------------

fn get_value<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    metadata
        .get(key)
        .ok_or_else(|| KernelError::MissingMetadata {
            key: key.to_string(),
        })
}

pub(crate) fn get_string(metadata: &HashMap<String, Value>, key: &str) -> Result<String> {
    get_value(metadata, key)?
        .to_string()
        .cloned()
        .map_err(|_| KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a string",
        })
}

pub(crate) fn get_string_array(
    metadata: &HashMap<String, Value>,
    key: &str,
) -> Result<Vec<String>> {
    let bad = || KernelError::BadMetadata {
        key: key.into(),
        expected: "an array of strings",
    };
    match get_value(metadata, key)? {
        Value::Array(values) => values
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| bad()))
            .collect(),
        _ => Err(bad()),
    }
}

pub(crate) fn get_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize> {
    opt_usize(metadata, key)?.ok_or_else(|| KernelError::MissingMetadata {
        key: key.to_string(),
    })
}

pub(crate) fn opt_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<usize>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let n = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I16(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I32(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        Value::I64(v) => u64::try_from(*v).unwrap_or(u64::MAX),
        _ => u64::MAX,
    };
    // No real model has a hyper-parameter near 2^32; a larger value is a
    // corrupt or hostile file and would only overflow allocations later.
    if n > u64::from(u32::MAX) {
        return Err(KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a non-negative integer below 2^32",
        });
    }
    Ok(Some(n as usize))
}

pub(crate) fn opt_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<f32>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(v)) => Ok(Some(*v)),
        Some(Value::F64(v)) => Ok(Some(*v as f32)),
        Some(_) => Err(KernelError::BadMetadata {
            key: key.to_string(),
            expected: "a float",
        }),
    }
}
