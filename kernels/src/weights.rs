//! Reads the weights of one shard: matrices (see `matrix`) and f32 vectors
//! (norm weights, RoPE factors), each checked against the shape the
//! architecture expects, and counts the bytes each takes as stored, so
//! that a shard knows exactly what it holds.

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::error::{KernelError, Result};
use crate::gguf::TensorReader;
use crate::matrix::Matrix;

/// A [`TensorReader`] that counts what it has loaded.
pub(crate) struct Weights<'a> {
    reader: TensorReader<'a>,
    bytes: u64,
    /// Every matrix loaded so far batches exactly (see
    /// [`Matrix::batches_exactly`]).
    batches_exactly: bool,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(reader: TensorReader<'a>) -> Self {
        Self {
            reader,
            bytes: 0,
            batches_exactly: true,
        }
    }

    pub(crate) fn device(&self) -> &Device {
        self.reader.device()
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.reader.has_tensor(name)
    }

    /// Bytes of every tensor loaded so far, each counted once.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether every matrix loaded so far gives each sequence of a batch
    /// the bits it gets alone.
    pub(crate) fn batches_exactly(&self) -> bool {
        self.batches_exactly
    }

    /// The `[rows, cols]` matrix `name`.
    pub(crate) fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let m = Matrix::load(&mut self.reader, name, rows, cols)?;
        self.bytes += m.byte_len();
        self.batches_exactly &= m.batches_exactly();
        Ok(m)
    }

    /// The `[len]` vector `name`, as f32 on the reader's device.
    pub(crate) fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let qt = self.reader.read(name)?;
        expect_shape(name, &qt, &[len])?;
        self.bytes += qt.storage_size_in_bytes() as u64;
        Ok(qt.dequantize(self.reader.device())?)
    }
}

fn expect_shape(name: &str, qt: &QTensor, expected: &[usize]) -> Result<()> {
    if qt.shape().dims() != expected {
        return Err(KernelError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: qt.shape().dims().to_vec(),
        });
    }
    Ok(())
}
