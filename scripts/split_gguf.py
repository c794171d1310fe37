"""Splits a GGUF model into N files the way llama.cpp's `llama-gguf-split --split` does.

Reads IN.gguf and writes OUT_PREFIX-00001-of-0000N.gguf ... OUT_PREFIX-0000N-of-0000N.gguf
(llama_split_path's "%s-%05d-of-%05d.gguf", numbered from 1), which llama.cpp loads as
one model when given the first file. As in llama-gguf-split:

  * the first part holds every key/value of the input, in the input's order, then the
    split keys; the other parts hold only the split keys. The split keys are
    split.no (u16, this part's zero-based index), split.tensors.count (i32, the tensor
    count of the whole model) and split.count (u16, N), in the order llama.cpp writes
    them (its gguf_set_val_* removes a key and appends it again, so split.count, set
    last, ends up last). Split keys already in the input (a merged model keeps them)
    are replaced, as llama.cpp does;
  * the tensors keep their order and are dealt out in consecutive runs; each part is an
    ordinary GGUF file with its own tensor directory, whose offsets count from that
    part's own data section, and each tensor's bytes are copied unchanged.

The runs have sizes that differ by at most one, larger first, so there are always exactly
N parts (llama-gguf-split --split-max-tensors ceil(n/N) gives the same runs when n % N is
0 or N-1, and otherwise fewer or unequal ones). One deliberate difference: for an input
with a general.alignment other than the default 32, every part is laid out with it and
the other parts get the key too (llama-gguf-split always lays parts out with 32). The
output is deterministic: the same input always gives the same bytes.

    python3 -m pip install gguf
    python3 scripts/split_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2 --parts 3
"""

import argparse
import sys

from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, Keys
from gguf_copy import copy_metadata, write_out

SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO                        # "split.no"
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT                  # "split.count"
SPLIT_TENSORS_COUNT = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # "split.tensors.count"


def split_path(prefix, index, count):
    """The file name llama.cpp's llama_split_path gives part `index` (zero-based)."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def tensor_runs(n_tensors, n_parts):
    """Consecutive index ranges covering 0..n_tensors, sizes within one of each other."""
    base, extra = divmod(n_tensors, n_parts)
    start = 0
    for i in range(n_parts):
        end = start + base + (1 if i < extra else 0)
        yield range(start, end)
        start = end


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="IN.gguf", help="GGUF model to split")
    parser.add_argument("prefix", metavar="OUT_PREFIX",
                        help="path prefix of the parts; part i is written to OUT_PREFIX-0000i-of-0000N.gguf")
    parser.add_argument("--parts", type=int, required=True, metavar="N",
                        help="number of files to write (1 to the model's tensor count)")
    args = parser.parse_args()

    reader = GGUFReader(args.input)
    n_tensors = len(reader.tensors)
    if reader.byte_order != "I":
        sys.exit(f"{args.input} is not in this machine's byte order; convert it first")
    count_field = reader.fields.get(SPLIT_COUNT)
    if count_field is not None and count_field.contents() > 1:
        sys.exit(f"{args.input} is already one part of a split model; merge it first")
    if not 1 <= args.parts <= min(n_tensors, 0xFFFF):  # split.count is a u16
        sys.exit(f"--parts must be between 1 and {min(n_tensors, 0xFFFF)} for this model")

    for index, run in enumerate(tensor_runs(n_tensors, args.parts)):
        path = split_path(args.prefix, index, args.parts)
        # GGUFWriter adds general.architecture (its `arch` argument) on its own; drop
        # it, so that the first part gets the input's keys in the input's order (the
        # architecture among them) and the other parts none of them.
        writer = GGUFWriter(path, arch="")
        writer.kv_data[0].clear()
        if index == 0:
            copy_metadata(reader, writer, skip={SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT})
        elif reader.alignment != GGUF_DEFAULT_ALIGNMENT:
            writer.add_custom_alignment(reader.alignment)  # see the note above
        writer.add_uint16(SPLIT_NO, index)
        writer.add_int32(SPLIT_TENSORS_COUNT, n_tensors)
        writer.add_uint16(SPLIT_COUNT, args.parts)

        for tensor in (reader.tensors[i] for i in run):
            # The reader gives quantized (and BF16) data as uint8 in the numpy "byte
            # shape", and F16/F32/integer data as typed arrays of the logical shape;
            # with raw_dtype the writer records the original ggml type and shape for
            # both, and writes the bytes as they are.
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)

        write_out(writer)
        print(f"wrote {path}: {len(run)} tensors ({run.start}..{run.stop - 1} of {n_tensors})")


if __name__ == "__main__":
    main()
