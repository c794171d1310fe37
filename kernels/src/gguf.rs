//! A GGUF model as a container: its header (metadata and tensor directory),
//! typed reads of metadata keys, each tensor's size, and a tensor's bytes
//! on request. A model may be split in parts as llama.cpp's `gguf-split`
//! writes them (`NAME-00001-of-00003.gguf`, `split.*` keys): the first part
//! holds the metadata, every part a tensor directory of its own. Tensors
//! are known only by name: which names a model needs and what they mean is
//! the architectures' business (`models`), so this module knows none.
//! Tensor data is read only when a shard asks for it, so a node never
//! touches the weights of layers it does not hold.

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

/// llama.cpp's split keys: this part's index from 0, the number of parts,
/// and the tensors in all parts.
const SPLIT_NO: &str = "split.no";
const SPLIT_COUNT: &str = "split.count";
const SPLIT_TENSORS: &str = "split.tensors.count";

/// One file of a model.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    content: Content,
    file_size: u64,
}

/// An opened GGUF model, of one file or several parts. Holds the headers,
/// never tensor data.
#[derive(Debug)]
pub(crate) struct GgufFile {
    parts: Vec<Part>,
    /// The part holding each tensor.
    part_of: HashMap<String, usize>,
    fingerprint: String,
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path`; when it is the first
    /// part of a split model, finds the other parts beside it by name.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let first = read_part(path)?;
        let count = split_value(&first, SPLIT_COUNT)?.unwrap_or(1);
        if count <= 1 {
            return Self::from_parts(vec![first]);
        }
        let not_first = |reason: String| KernelError::NotGguf {
            path: path.to_path_buf(),
            reason,
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let prefix = name
            .strip_suffix(&format!("-00001-of-{count:05}.gguf"))
            .ok_or_else(|| {
                not_first(format!(
                    "it is part of a model split in {count}; open the first part, named PREFIX-00001-of-{count:05}.gguf"
                ))
            })?;
        let mut parts = vec![first];
        for number in 2..=count {
            let sibling = path.with_file_name(format!("{prefix}-{number:05}-of-{count:05}.gguf"));
            if !sibling.is_file() {
                return Err(not_first(format!(
                    "part {number} of {count} ({}) is missing",
                    sibling.display()
                )));
            }
            parts.push(read_part(&sibling)?);
        }
        Self::from_parts(parts)
    }

    /// Reads the headers of a split model's parts, given in order (their
    /// names may be anything, such as a download's partial files).
    pub(crate) fn open_parts(paths: &[PathBuf]) -> Result<Self> {
        let parts = paths
            .iter()
            .map(|path| read_part(path))
            .collect::<Result<Vec<_>>>()?;
        if parts.is_empty() {
            return Err(KernelError::NotGguf {
                path: PathBuf::new(),
                reason: "no file given".into(),
            });
        }
        Self::from_parts(parts)
    }

    /// Checks that the parts are one model, in order, and indexes its
    /// tensors.
    fn from_parts(parts: Vec<Part>) -> Result<Self> {
        let count = parts.len();
        let mut part_of = HashMap::new();
        for (index, part) in parts.iter().enumerate() {
            let bad = |reason: String| KernelError::NotGguf {
                path: part.path.clone(),
                reason,
            };
            if count > 1 {
                let (no, of) = (
                    split_value(part, SPLIT_NO)?,
                    split_value(part, SPLIT_COUNT)?,
                );
                if no != Some(index) || of != Some(count) {
                    return Err(bad(format!(
                        "it should be part {} of {count}, but its split.no is {no:?} and split.count {of:?}",
                        index + 1
                    )));
                }
            }
            for name in part.content.tensor_infos.keys() {
                if part_of.insert(name.clone(), index).is_some() {
                    return Err(bad(format!("tensor `{name}` is in two parts")));
                }
            }
        }
        if count > 1 {
            let expected = split_value(&parts[0], SPLIT_TENSORS)?;
            if expected != Some(part_of.len()) {
                return Err(KernelError::NotGguf {
                    path: parts[0].path.clone(),
                    reason: format!(
                        "the parts hold {} tensors, but split.tensors.count says {expected:?}",
                        part_of.len()
                    ),
                });
            }
        }
        let fingerprint = fingerprint_headers(&parts)?;
        Ok(Self {
            parts,
            part_of,
            fingerprint,
        })
    }

    /// The first part's path.
    pub(crate) fn path(&self) -> &Path {
        &self.parts[0].path
    }

    pub(crate) fn part_count(&self) -> usize {
        self.parts.len()
    }

    /// `sha256:<hex>` over each part's length and header (see
    /// `ModelFile::fingerprint`).
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The model's metadata: the first part's.
    pub(crate) fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].content.metadata
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.part_of.contains_key(name)
    }

    fn tensor_info(&self, name: &str) -> Result<(&Part, &TensorInfo)> {
        self.part_of
            .get(name)
            .and_then(|&index| {
                let part = &self.parts[index];
                Some((part, part.content.tensor_infos.get(name)?))
            })
            .ok_or_else(|| KernelError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Where tensor `name`'s data lies: the index of its part and
    /// `[start, end)` in that file.
    pub(crate) fn tensor_extent(&self, name: &str) -> Result<(usize, Range<u64>)> {
        let (part, info) = self.tensor_info(name)?;
        let index = self.part_of.get(name).copied().unwrap_or_default();
        let start = part.content.tensor_data_offset.checked_add(info.offset);
        start
            .and_then(|start| Some(start..start.checked_add(self.tensor_bytes(name).ok()?)?))
            .map(|range| (index, range))
            .ok_or_else(|| KernelError::NotGguf {
                path: part.path.clone(),
                reason: format!("tensor `{name}` lies past any possible file end"),
            })
    }

    /// Bytes of one tensor's data as stored in the file.
    pub(crate) fn tensor_bytes(&self, name: &str) -> Result<u64> {
        let (part, info) = self.tensor_info(name)?;
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
                path: part.path.clone(),
                reason: format!(
                    "tensor `{name}` has an impossible size {:?}",
                    info.shape.dims()
                ),
            })
    }

    /// Checks that tensor `name` exists, fills whole blocks of its format,
    /// and lies inside its file (a truncated download fails here, at open,
    /// rather than mid-load).
    pub(crate) fn check_tensor(&self, name: &str) -> Result<()> {
        let (part, info) = self.tensor_info(name)?;
        let block = info.ggml_dtype.block_size();
        if info.shape.elem_count() % block != 0 {
            return Err(KernelError::NotGguf {
                path: part.path.clone(),
                reason: format!(
                    "tensor `{name}` has {} elements, not a multiple of its block size {block}",
                    info.shape.elem_count()
                ),
            });
        }
        let end = self.tensor_extent(name).map_or(u64::MAX, |(_, r)| r.end);
        if end > part.file_size {
            return Err(KernelError::NotGguf {
                path: part.path.clone(),
                reason: format!(
                    "tensor `{name}` ends at byte {end} but the file has {} bytes (truncated download?)",
                    part.file_size
                ),
            });
        }
        Ok(())
    }

    /// A reader of this model's tensors onto `device`.
    pub(crate) fn reader(&self, device: &Device) -> Result<TensorReader<'_>> {
        Ok(TensorReader {
            file: self,
            readers: self.parts.iter().map(|_| None).collect(),
            device: device.clone(),
        })
    }
}

fn read_part(path: &Path) -> Result<Part> {
    let io_error = |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let file_size = file.metadata().map_err(io_error)?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| KernelError::NotGguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Part {
        path: path.to_path_buf(),
        content,
        file_size,
    })
}

/// A `split.*` key of a part, when present.
fn split_value(part: &Part, key: &str) -> Result<Option<usize>> {
    opt_usize(&part.content.metadata, key).map_err(|_| KernelError::NotGguf {
        path: part.path.clone(),
        reason: format!("its `{key}` is not a small non-negative integer"),
    })
}

/// Reads individual tensors of a model onto one device, opening each part
/// when a tensor in it is first read.
pub(crate) struct TensorReader<'a> {
    file: &'a GgufFile,
    readers: Vec<Option<BufReader<File>>>,
    device: Device,
}

impl TensorReader<'_> {
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.file.has_tensor(name)
    }

    /// The open reader of the part holding `name`, with the part.
    fn part_reader(&mut self, name: &str) -> Result<(&Part, &mut BufReader<File>)> {
        let index =
            self.file
                .part_of
                .get(name)
                .copied()
                .ok_or_else(|| KernelError::MissingTensor {
                    name: name.to_string(),
                })?;
        let part = &self.file.parts[index];
        let reader = match &mut self.readers[index] {
            Some(reader) => reader,
            slot => {
                let file = File::open(&part.path).map_err(|source| KernelError::Io {
                    path: part.path.clone(),
                    source,
                })?;
                slot.insert(BufReader::new(file))
            }
        };
        Ok((part, reader))
    }

    /// The tensor's format, shape (Candle order: outermost first) and its
    /// bytes exactly as stored.
    pub(crate) fn read_raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let (_, info) = self.file.tensor_info(name)?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        let (_, range) = self.file.tensor_extent(name)?;
        let (part, reader) = self.part_reader(name)?;
        let io_error = |source| KernelError::Io {
            path: part.path.clone(),
            source,
        };
        reader
            .seek(SeekFrom::Start(range.start))
            .map_err(io_error)?;
        let mut data = vec![0u8; (range.end - range.start) as usize];
        reader.read_exact(&mut data).map_err(io_error)?;
        Ok((dtype, dims, data))
    }

    pub(crate) fn dtype(&self, name: &str) -> Result<GgmlDType> {
        Ok(self.file.tensor_info(name)?.1.ggml_dtype)
    }

    pub(crate) fn read(&mut self, name: &str) -> Result<QTensor> {
        let device = self.device.clone();
        let (part, reader) = self.part_reader(name)?;
        let info =
            part.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| KernelError::MissingTensor {
                    name: name.to_string(),
                })?;
        Ok(info.read(reader, part.content.tensor_data_offset, &device)?)
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

/// SHA-256 over each part's length and header bytes, in order: for one
/// file, its length and header.
fn fingerprint_headers(parts: &[Part]) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    for part in parts {
        let io_error = |source| KernelError::Io {
            path: part.path.clone(),
            source,
        };
        let mut reader = File::open(&part.path).map_err(io_error)?;
        hasher.update(part.file_size.to_le_bytes());
        let mut remaining = part.content.tensor_data_offset;
        while remaining > 0 {
            let take = remaining.min(buf.len() as u64) as usize;
            reader.read_exact(&mut buf[..take]).map_err(io_error)?;
            hasher.update(&buf[..take]);
            remaining -= take as u64;
        }
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
