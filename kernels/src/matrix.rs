//! A weight matrix and the kernel that multiplies by it: ringlet's own
//! ggml-exact kernels (`quant`) on the CPU for the block formats they
//! handle, Candle's quantized matmul for everything else (GPU devices,
//! K-quants, f16/f32 weights).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::cpu_ops;
use crate::error::{KernelError, Result};
use crate::gguf::TensorReader;
use crate::quant::{BlockFormat, QuantMatrix};

/// A `[rows, cols]` weight matrix; rows are output features.
#[derive(Clone)]
pub(crate) enum Matrix {
    Quant(Arc<QuantMatrix>),
    Candle {
        tensor: Arc<QTensor>,
        matmul: QMatMul,
    },
}

impl Matrix {
    /// Reads tensor `name`, which must have shape `[rows, cols]`.
    pub(crate) fn load(
        reader: &mut TensorReader<'_>,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let format = BlockFormat::from_ggml(reader.dtype(name)?);
        match (format, reader.device().is_cpu()) {
            (Some(format), true) => {
                let (_, dims, data) = reader.read_raw(name)?;
                check_shape(name, &dims, rows, cols)?;
                Ok(Self::Quant(Arc::new(QuantMatrix::new(
                    name, format, rows, cols, data,
                )?)))
            }
            _ => {
                let tensor = reader.read(name)?;
                check_shape(name, tensor.shape().dims(), rows, cols)?;
                let tensor = Arc::new(tensor);
                let matmul = QMatMul::from_arc(Arc::clone(&tensor))?;
                Ok(Self::Candle { tensor, matmul })
            }
        }
    }

    /// Bytes of the weights as stored.
    pub(crate) fn byte_len(&self) -> u64 {
        match self {
            Self::Quant(m) => m.byte_len() as u64,
            Self::Candle { tensor, .. } => tensor.storage_size_in_bytes() as u64,
        }
    }

    /// `x`: `[m, cols]` → `[m, rows]`, where `x`'s rows belong to
    /// sequences of `sequence_rows` rows each (see
    /// [`QuantMatrix::matmul_each`]).
    pub(crate) fn matmul(&self, x: &Tensor, sequence_rows: &[usize]) -> Result<Tensor> {
        match self {
            Self::Quant(w) => {
                let m = x.dim(0)?;
                // The activations are read in place, not copied out first.
                let mut out = cpu_ops::with_f32(&x.to_dtype(DType::F32)?, |values| {
                    QuantMatrix::matmul_each(&[w.as_ref()], values, sequence_rows)
                })??;
                Ok(Tensor::from_vec(out.remove(0), (m, w.rows()), x.device())?)
            }
            Self::Candle { matmul, .. } => Ok(matmul.forward(x)?),
        }
    }

    /// Whether products with this matrix give each sequence of a batch
    /// the bits it gets alone: ringlet's kernels do; Candle's promise
    /// nothing of the kind.
    pub(crate) fn batches_exactly(&self) -> bool {
        matches!(self, Self::Quant(_))
    }

    /// `x` times each of `matrices`: on the CPU with ringlet's kernels in
    /// one parallel pass (see [`QuantMatrix::matmul_each`]), else one by
    /// one.
    pub(crate) fn matmul_each(
        matrices: &[&Matrix],
        x: &Tensor,
        sequence_rows: &[usize],
    ) -> Result<Vec<Tensor>> {
        let quant: Option<Vec<&QuantMatrix>> = matrices
            .iter()
            .map(|w| match w {
                Self::Quant(w) => Some(w.as_ref()),
                Self::Candle { .. } => None,
            })
            .collect();
        let same_activation = quant.as_ref().is_some_and(|q| {
            q.windows(2)
                .all(|p| p[0].format().activation_bytes() == p[1].format().activation_bytes())
        });
        match quant {
            Some(quant) if same_activation => {
                let m = x.dim(0)?;
                let outs = cpu_ops::with_f32(&x.to_dtype(DType::F32)?, |values| {
                    QuantMatrix::matmul_each(&quant, values, sequence_rows)
                })??;
                outs.into_iter()
                    .zip(&quant)
                    .map(|(out, w)| Ok(Tensor::from_vec(out, (m, w.rows()), x.device())?))
                    .collect()
            }
            _ => matrices
                .iter()
                .map(|w| w.matmul(x, sequence_rows))
                .collect(),
        }
    }

    /// Rows `ids` as f32, `[ids.len(), cols]`.
    pub(crate) fn embed(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Quant(w) => Ok(Tensor::from_vec(
                w.dequantize_rows(ids),
                (ids.len(), w.cols()),
                device,
            )?),
            Self::Candle { tensor, .. } => {
                let ids = Tensor::new(ids, device)?;
                Ok(tensor.embedding(&ids)?.to_dtype(DType::F32)?)
            }
        }
    }
}

fn check_shape(name: &str, dims: &[usize], rows: usize, cols: usize) -> Result<()> {
    if dims != [rows, cols] {
        return Err(KernelError::TensorShape {
            name: name.to_string(),
            expected: vec![rows, cols],
            got: dims.to_vec(),
        });
    }
    Ok(())
}
