"""Re-encodes the quantized weight matrices of a GGUF model as Q8_0.

Reads IN.gguf and writes OUT.gguf with the same metadata (key order, types
and values, tokenizer included) and the same tensors (names, shapes, order).
Only general.file_type changes, to 7 (LLAMA_FTYPE_MOSTLY_Q8_0). The 2-D
weight matrices stored as Q4_0, Q4_1, Q5_0, Q5_1 or F16 are dequantized to
float32 and quantized again as Q8_0; those already Q8_0 are copied byte for
byte (re-encoding them would at best give the same bytes). Every other tensor,
such as the F32 norm vectors, is copied unchanged. The output is deterministic:
the same input always gives the same bytes.

    python3 -m pip install gguf numpy
    python3 scripts/requantize_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q8_0.gguf
"""

import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from gguf.constants import GGML_QUANT_SIZES, Keys
from gguf_copy import copy_metadata, write_out

Q = GGMLQuantizationType
TARGETS = {"Q8_0": (Q.Q8_0, 7)}  # output type -> (ggml type, general.file_type)
CONVERTIBLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16}


def convert(tensor, target):
    """The tensor's data as (array for GGUFWriter.add_tensor, raw ggml type).

    GGUFReader gives quantized data as uint8 with the numpy "byte shape"
    (axes reversed from ggml's ne order, last axis in bytes), and F16/F32 as
    float arrays of the logical numpy shape. quants.dequantize maps the byte
    shape to the logical float32 shape, quants.quantize maps it back to the
    byte shape, and add_tensor(raw_dtype=...) turns a uint8 byte shape back
    into the logical shape it records, so shapes survive the round trip.
    """
    src = tensor.tensor_type
    # A matrix whose rows (ne0, the first ggml dimension) split into whole blocks.
    block_size = GGML_QUANT_SIZES[target][0]
    is_matrix = len(tensor.shape) == 2 and int(tensor.shape[0]) % block_size == 0
    if src == target or src not in CONVERTIBLE or not is_matrix:
        return tensor.data, src  # copied as stored
    values = quants.dequantize(tensor.data, src)  # float32, logical shape
    return quants.quantize(values, target), target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="IN.gguf", help="GGUF model to read")
    parser.add_argument("output", metavar="OUT.gguf", help="where to write the re-quantized copy")
    parser.add_argument("--type", choices=sorted(TARGETS), default="Q8_0",
                        help="quantization of the rewritten weight matrices (default and only choice: Q8_0)")
    args = parser.parse_args()
    target, file_type = TARGETS[args.type]

    reader = GGUFReader(args.input)
    arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
    if arch_field is None:
        sys.exit(f"{args.input} has no {Keys.General.ARCHITECTURE}")
    if reader.byte_order != "I":
        sys.exit(f"{args.input} is not in this machine's byte order; convert it first")

    writer = GGUFWriter(args.output, arch_field.contents())
    # GGUFWriter writes general.architecture itself, as its first key (where
    # converters, llama.cpp's included, put it).
    copy_metadata(
        reader,
        writer,
        skip={Keys.General.ARCHITECTURE},
        replace={Keys.General.FILE_TYPE: lambda w: w.add_file_type(file_type)},
    )

    converted = 0
    for tensor in reader.tensors:
        data, raw_dtype = convert(tensor, target)
        converted += raw_dtype != tensor.tensor_type
        # Quantized data (uint8 bytes) needs raw_dtype; float and integer
        # tensors are typed by their numpy dtype.
        writer.add_tensor(tensor.name, data, raw_dtype=raw_dtype if data.dtype == np.uint8 else None)

    write_out(writer)
    print(f"wrote {args.output}: {len(reader.tensors)} tensors, {converted} re-encoded as {args.type}")


if __name__ == "__main__":
    main()
