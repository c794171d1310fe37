"""Writes a GGUF with random weights and real large-model shapes, for
benchmarks where matrix products dominate as they do in real clusters.

The default is Llama-3-8B's layer shapes (hidden 4096, feed-forward 14336,
32 query and 8 key/value heads of 128) with a few layers, Q4_1 weights and
a Q8_0 embedding tied to the output, like the default model's file. The
tokenizer and chat template are copied from a base GGUF (the default
model), so that ringlet and llama.cpp both load and prompt it.

    python3 -m pip install gguf==0.17.1 numpy
    python3 scripts/make_scale_model.py --base ~/.cache/ringlet/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out /tmp/llama3-8b-shapes-4l.gguf --layers 4
    ringlet bench --model /tmp/llama3-8b-shapes-4l.gguf --threads 2

Its answers are noise; only its speed means anything.
"""

import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from gguf_copy import write_out

SHAPES = {
    # hidden, feed-forward, query heads, key/value heads, rope base
    "llama3-8b": (4096, 14336, 32, 8, 500000.0),
    "llama3-70b": (8192, 28672, 64, 8, 500000.0),
}


def random_matrix(rng, rows, cols, qtype):
    """A [rows, cols] matrix of N(0, 0.02) weights, quantized."""
    values = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    return quants.quantize(values, qtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="GGUF whose tokenizer and chat template to copy")
    parser.add_argument("--out", required=True, help="where to write the new GGUF")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    hidden, ff, heads, kv_heads, rope_base = SHAPES[args.shape]
    head_dim = hidden // heads
    base = GGUFReader(args.base)
    tokens = base.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        sys.exit(f"{args.base} has no tokenizer.ggml.tokens: pass the default model's GGUF as --base")
    vocab = len(tokens.data)

    writer = GGUFWriter(args.out, "llama")
    writer.add_name(f"random {args.shape} shapes, {args.layers} layers")
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(3)  # mostly Q4_1
    for name, field in base.fields.items():
        if name.startswith("tokenizer."):
            main_type = field.types[0]
            sub_type = field.types[-1] if main_type == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), main_type, sub_type)

    rng = np.random.default_rng(args.seed)
    q4_1, q8_0 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
    print(f"writing {args.out}: {args.shape} shapes, {args.layers} layers, vocabulary {vocab}", flush=True)
    writer.add_tensor("token_embd.weight", random_matrix(rng, vocab, hidden, q8_0), raw_dtype=q8_0)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for layer in range(args.layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for name, rows, cols in [
            ("attn_q", heads * head_dim, hidden),
            ("attn_k", kv_heads * head_dim, hidden),
            ("attn_v", kv_heads * head_dim, hidden),
            ("attn_output", hidden, heads * head_dim),
            ("ffn_gate", ff, hidden),
            ("ffn_up", ff, hidden),
            ("ffn_down", hidden, ff),
        ]:
            writer.add_tensor(prefix + name + ".weight", random_matrix(rng, rows, cols, q4_1), raw_dtype=q4_1)
        print(f"  layer {layer + 1}/{args.layers} quantized", flush=True)

    write_out(writer)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
