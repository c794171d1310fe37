"""Writes a GGUF with random weights and real model shapes, for benchmarks and tests.

It serves benchmarks where matrix products dominate as they do in real
clusters, and tests of model families and quantization mixes that need no
download of the real models.

The default (--family llama3-8b-shapes) is Llama-3-8B's layer shapes (hidden
4096, feed-forward 14336, 32 query and 8 key/value heads of 128) with a few
layers, Q4_1 weights and a Q8_0 embedding tied to the output, like the default
model's file.

--family qwen2, qwen3 or gemma3 writes that family's smallest model
(Qwen2.5-0.5B-Instruct, Qwen3-0.6B, Gemma-3-1B) with all its layers, the
metadata keys and tensors convert_hf_to_gguf.py writes for it, in the tensor
order and with the per-tensor types llama-quantize gives the --quant mix
(q8_0, q4_k_m or q4_1). Its quantized blocks are written directly, random
quants with chosen scales, rather than quantized from floats (see matrix());
the weights have a standard deviation near 0.02 and a mean near 0, norms are
near 1 and biases near 0, all in F32.

The tokenizer and chat template are copied from a base GGUF (the default
model), so that ringlet and llama.cpp both load and prompt the file. The same
arguments and numpy version give the same bytes: there are no timestamps and
the weights come from --seed.

    python3 -m pip install gguf==0.19.0 numpy
    python3 scripts/make_scale_model.py --base ~/.cache/ringlet/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out /tmp/llama3-8b-shapes-4l.gguf --layers 4
    ringlet bench --model /tmp/llama3-8b-shapes-4l.gguf --threads 2

    python3 scripts/make_scale_model.py --base <default model GGUF> --family qwen3 --quant q4_k_m --out /tmp/qwen3.gguf

    # the four family test files (qwen2 and qwen3, Q8_0 and Q4_K_M), with
    # their SHA-256 in `sha256sum` form, to check with `cd DIR && sha256sum -c`
    python3 scripts/make_scale_model.py --base <default model GGUF> --all-families /tmp/family-models

Its answers are noise; only its speed, and whether it loads and runs, mean anything.
"""

import argparse
import hashlib
import os
import sys
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, quants
from gguf.constants import GGML_QUANT_VERSION
from gguf_copy import copy_metadata, write_out

SHAPES = {
    # hidden, feed-forward, query heads, key/value heads, rope base
    "llama3-8b": (4096, 14336, 32, 8, 500000.0),
    "llama3-70b": (8192, 28672, 64, 8, 500000.0),
}


class Family(NamedTuple):
    """One model family's smallest model, as its Hugging Face config gives it."""

    arch: str  # general.architecture, and the prefix of the family's keys
    model: str  # the model whose config this copies
    layers: int
    hidden: int
    ff: int
    heads: int
    kv_heads: int
    head_dim: int
    key_length: bool  # whether the config names head_dim, so that convert writes key/value_length
    rope_base: float
    eps: float
    context: int
    block_tensors: tuple  # each block's tensors, by their GGUF names
    sliding_window: int = 0


FAMILIES = {
    # Qwen2 has biases on q, k and v; its config has no head_dim (896 / 14 = 64).
    "qwen2": Family(
        "qwen2", "Qwen2.5-0.5B-Instruct", 24, 896, 4864, 14, 2, 64, False, 1000000.0, 1e-6, 32768,
        ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
         "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight",
         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")),
    # Qwen3 drops the biases and normalizes each head of q and k; its heads are
    # 128 wide, so q is 2048 wide against a hidden 1024.
    "qwen3": Family(
        "qwen3", "Qwen3-0.6B", 28, 1024, 3072, 16, 8, 128, True, 1000000.0, 1e-6, 40960,
        ("attn_norm.weight", "attn_q.weight", "attn_q_norm.weight", "attn_k.weight", "attn_k_norm.weight",
         "attn_v.weight", "attn_output.weight", "ffn_norm.weight",
         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")),
    # Gemma 3 adds norms after attention and after the feed-forward, and
    # sliding-window attention on five layers in six.
    "gemma3": Family(
        "gemma3", "gemma-3-1b-it", 26, 1152, 6912, 4, 1, 256, True, 1000000.0, 1e-6, 32768,
        ("attn_norm.weight", "attn_q.weight", "attn_q_norm.weight", "attn_k.weight", "attn_k_norm.weight",
         "attn_v.weight", "attn_output.weight", "post_attention_norm.weight", "ffn_norm.weight",
         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"),
        sliding_window=512),
}

# --quant: llama-quantize's default type for the mix, and general.file_type.
QUANTS = {
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}

# What --all-families writes: the files the family tests load.
TEST_FILES = [("qwen2", "q8_0"), ("qwen2", "q4_k_m"), ("qwen3", "q8_0"), ("qwen3", "q4_k_m")]

WEIGHT_STD = 0.02
QK_K = 256  # values in a K-quant block


def random_matrix(rng, rows, cols, qtype):
    """A [rows, cols] matrix of N(0, 0.02) weights, quantized with gguf-py: the
    llama3-8b-shapes Q4_1 file is made so."""
    values = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(WEIGHT_STD)
    return quants.quantize(values, qtype)


def mean_square(low, high):
    """The mean of k*k for an integer k drawn uniformly from [low, high)."""
    k = np.arange(low, high, dtype=np.float64)
    return float(np.mean(k * k))


def block_scales(rng, n_blocks, q_mean_square, scale_mean_square):
    """Each block's f16 super-scale d, drawn around the value that gives
    weights of standard deviation WEIGHT_STD.

    A weight is d * scale * (q - centre) (scale 1 where a block has only d),
    so its variance is E[d^2] E[scale^2] E[(q - centre)^2]. d varies by +-20%
    from block to block (E[u^2] of u in [0.8, 1.2] is 1 + 0.4^2 / 12), as real
    blocks do.
    """
    d0 = WEIGHT_STD / np.sqrt((1 + 0.4**2 / 12) * scale_mean_square * q_mean_square)
    return (d0 * rng.uniform(0.8, 1.2, n_blocks)).astype("<f2")


def f16_bytes(values):
    """[n] float16 values as an [n, 2] byte array, little-endian as GGUF is."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def pack_q4_k_scales(sc, mins):
    """Packs eight 6-bit scales and eight 6-bit mins per block into 12 bytes as
    ggml does: bytes 0-3 and 4-7 hold scales and mins 0-3 in their low six bits
    and the high two bits of scales and mins 4-7 in their top two; bytes 8-11
    hold the low four bits of scales 4-7 (low nibble) and mins 4-7 (high
    nibble). gguf's Q4_K.get_scale_min unpacks exactly this.
    """
    low_sc, high_sc = sc[:, :4], sc[:, 4:]
    low_m, high_m = mins[:, :4], mins[:, 4:]
    return np.concatenate([
        low_sc | ((high_sc >> 4) << 6),
        low_m | ((high_m >> 4) << 6),
        (high_sc & 0x0F) | ((high_m & 0x0F) << 4),
    ], axis=1).astype(np.uint8)


def random_q4_k(rng, rows, cols):
    """A [rows, cols] Q4_K matrix written directly: 144-byte blocks of
    d (f16), dmin (f16), 12 bytes of packed scales and mins, 128 bytes of nibbles.

    A weight is d * sc * q - dmin * m for q in 0..15. Taking m = sc and
    dmin = 7.5 d centres every sub-block on 0: d * sc * (q - 7.5). Scales are
    drawn from 8..31, well inside the six bits, so d stays a normal f16.
    """
    n = rows * cols // QK_K
    sc = rng.integers(8, 32, size=(n, 8), dtype=np.uint8)
    d = block_scales(rng, n, (16 * 16 - 1) / 12, mean_square(8, 32))
    dmin = (d.astype(np.float32) * np.float32(7.5)).astype("<f2")
    qs = rng.integers(0, 256, size=(n, QK_K // 2), dtype=np.uint8)
    blocks = np.concatenate([f16_bytes(d), f16_bytes(dmin), pack_q4_k_scales(sc, sc), qs], axis=1)
    return blocks.reshape(rows, -1)


def random_q6_k(rng, rows, cols):
    """A [rows, cols] Q6_K matrix written directly: 210-byte blocks of ql (128
    bytes: low four bits), qh (64 bytes: high two bits), sixteen int8 scales, d (f16).

    A weight is d * scale * (q - 32) for q in 0..63, which random ql and qh
    bytes draw uniformly. q - 32 has mean -0.5, so the scales' signs are drawn
    at random to centre the weights on 0; their sizes come from 4..15, so d
    stays a normal f16.
    """
    n = rows * cols // QK_K
    q_bits = rng.integers(0, 256, size=(n, QK_K // 2 + QK_K // 4), dtype=np.uint8)
    sign = rng.integers(0, 2, size=(n, QK_K // 16), dtype=np.int8) * np.int8(2) - np.int8(1)
    scales = (rng.integers(4, 16, size=(n, QK_K // 16), dtype=np.int8) * sign).view(np.uint8)
    q_mean_square = mean_square(-32, 32)
    d = block_scales(rng, n, q_mean_square, mean_square(4, 16))
    blocks = np.concatenate([q_bits, scales, f16_bytes(d)], axis=1)
    return blocks.reshape(rows, -1)


def random_q8_0(rng, rows, cols):
    """A [rows, cols] Q8_0 matrix written directly: 34-byte blocks of d (f16)
    and 32 int8 q, a weight being d * q. q is drawn from -127..127, so the
    weights are centred on 0."""
    n = rows * cols // 32
    d = block_scales(rng, n, mean_square(-127, 128), 1.0)
    qs = rng.integers(-127, 128, size=(n, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([f16_bytes(d), qs], axis=1).reshape(rows, -1)


def random_q5_0(rng, rows, cols):
    """A [rows, cols] Q5_0 matrix written directly: 22-byte blocks of d (f16),
    4 bytes of fifth bits and 16 bytes of nibbles, a weight being d * (q - 16)
    for q in 0..31. q - 16 has mean -0.5, so d's sign is drawn at random (as
    llama.cpp's d is often negative) to centre the weights on 0."""
    n = rows * cols // 32
    sign = rng.integers(0, 2, size=n) * 2 - 1
    d = (block_scales(rng, n, mean_square(-16, 16), 1.0) * sign).astype("<f2")
    q_bits = rng.integers(0, 256, size=(n, 4 + 16), dtype=np.uint8)
    return np.concatenate([f16_bytes(d), q_bits], axis=1).reshape(rows, -1)


def random_q4_1(rng, rows, cols):
    """A [rows, cols] Q4_1 matrix written directly: 20-byte blocks of d (f16),
    m (f16) and 16 bytes of nibbles, a weight being d * q + m for q in 0..15.
    m = -7.5 d centres the weights on 0."""
    n = rows * cols // 32
    d = block_scales(rng, n, (16 * 16 - 1) / 12, 1.0)
    m = (d.astype(np.float32) * np.float32(-7.5)).astype("<f2")
    qs = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return np.concatenate([f16_bytes(d), f16_bytes(m), qs], axis=1).reshape(rows, -1)


def matrix(rng, rows, cols, qtype):
    """A [rows, cols] matrix of random weights of type qtype, as GGUF bytes.

    The blocks are written directly with random quants and chosen scales, not
    quantized from floats: that is ten times faster (gguf-py's quantizers run
    at some 20-30 M values a second, and the family files hold 1.5 G), covers
    the K-quants gguf-py cannot quantize to, and leaves the bytes depending on
    numpy's generator alone.
    """
    writers = {
        GGMLQuantizationType.Q8_0: random_q8_0,
        GGMLQuantizationType.Q5_0: random_q5_0,
        GGMLQuantizationType.Q4_1: random_q4_1,
        GGMLQuantizationType.Q4_K: random_q4_k,
        GGMLQuantizationType.Q6_K: random_q6_k,
    }
    return writers[qtype](rng, rows, cols)


def use_more_bits(layer, layers):
    """llama-quantize's choice of the blocks whose attn_v and ffn_down get more
    bits in the _M mixes: the first and last eighth, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def fallback(qtype, cols):
    """llama-quantize's type for a row length the type cannot hold: K-quants
    need rows of whole 256-value blocks (Qwen2.5-0.5B's 896 is not)."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback_type = {
        GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
    }[qtype]
    assert cols % GGML_QUANT_SIZES[fallback_type][0] == 0, f"no type holds rows of {cols}"
    return fallback_type


def tensor_type(quant, name, cols, layers):
    """The type llama-quantize gives the matrix `name` (rows of `cols` values)
    in the --quant mix, for a model with tied embeddings.

    Follows llama_tensor_get_type_impl in llama.cpp's src/llama-quant.cpp for
    these mixes: the tied embedding is quantized as the output is (Q6_K unless
    the mix is Q8_0 or its rows do not fit the mix's blocks); Q4_K_M gives Q6_K
    to attn_v and ffn_down in use_more_bits blocks. llama-quantize counts those
    tensors in its tensor order, which is block order (see quantize_order), so
    the block number stands for the count.
    """
    default_type = QUANTS[quant][0]
    qtype = default_type
    if name == "token_embd.weight":
        if cols % GGML_QUANT_SIZES[default_type][0] != 0:
            qtype = GGMLQuantizationType.Q8_0
        elif default_type != GGMLQuantizationType.Q8_0:
            qtype = GGMLQuantizationType.Q6_K
    elif quant == "q4_k_m" and name.endswith(("attn_v.weight", "ffn_down.weight")):
        if use_more_bits(int(name.split(".")[1]), layers):
            qtype = GGMLQuantizationType.Q6_K
    return fallback(qtype, cols)


def quantize_order(name):
    """llama-quantize writes tensors in its loader's order: by block number,
    tensors outside the blocks first, then by name."""
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def tensor_shape(family, name):
    """A tensor's numpy shape, from its GGUF name: a matrix is [rows (outputs),
    cols (inputs)], GGUF's [ne0 = cols, ne1 = rows] reversed."""
    hidden, q_dim = family.hidden, family.heads * family.head_dim
    kv_dim = family.kv_heads * family.head_dim
    kind = name.split(".")[-2]
    matrices = {
        "token_embd": (None, hidden),  # rows: the vocabulary, filled in by the caller
        "attn_q": (q_dim, hidden),
        "attn_k": (kv_dim, hidden),
        "attn_v": (kv_dim, hidden),
        "attn_output": (hidden, q_dim),
        "ffn_gate": (family.ff, hidden),
        "ffn_up": (family.ff, hidden),
        "ffn_down": (hidden, family.ff),
    }
    if name.endswith(".bias"):
        return (matrices[kind][0],)
    if kind in ("attn_q_norm", "attn_k_norm"):
        return (family.head_dim,)
    if kind.endswith("norm"):
        return (hidden,)
    return matrices[kind]


def vector(rng, name, length):
    """A norm's weights near 1 (they multiply), or a bias near 0 (it adds)."""
    values = rng.standard_normal(length, dtype=np.float32)
    if name.endswith(".bias"):
        return values * np.float32(WEIGHT_STD)
    return np.float32(1) + values * np.float32(0.1)


def copy_tokenizer(base, writer):
    """Copies the base file's tokenizer.* keys (vocabulary, merges, special
    tokens, chat template), in its order and types."""
    skip = [name for name in base.fields if not name.startswith("tokenizer.")]
    copy_metadata(base, writer, skip=skip)


def open_base(path):
    """The base GGUF's reader and vocabulary size."""
    base = GGUFReader(path)
    tokens = base.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        sys.exit(f"{path} has no tokenizer.ggml.tokens: pass the default model's GGUF as --base")
    return base, len(tokens.data)


def write_llama_shapes(args, base, vocab):
    """--family llama3-8b-shapes: Llama-3 shapes with --layers layers. With the
    default --quant q4_1 the file is the one this script has always written."""
    hidden, ff, heads, kv_heads, rope_base = SHAPES[args.shape]
    head_dim = hidden // heads
    layers = args.layers or 4

    rng = np.random.default_rng(args.seed)

    def weights(name, rows, cols):
        """The matrix's type and bytes. q4_1 keeps this script's first mix (a
        Q8_0 embedding, like the default model's file) and quantizes N(0, 0.02)
        floats as it always has, so that its files stay the same."""
        if args.quant == "q4_1":
            qtype = GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else GGMLQuantizationType.Q4_1
            return qtype, random_matrix(rng, rows, cols, qtype)
        qtype = tensor_type(args.quant, name, cols, layers)
        return qtype, matrix(rng, rows, cols, qtype)

    writer = GGUFWriter(args.out, "llama")
    writer.add_name(f"random {args.shape} shapes, {layers} layers")
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(QUANTS[args.quant][1])
    copy_tokenizer(base, writer)

    print(f"writing {args.out}: {args.shape} shapes, {layers} layers, vocabulary {vocab}", flush=True)
    embd_type, embd = weights("token_embd.weight", vocab, hidden)
    writer.add_tensor("token_embd.weight", embd, raw_dtype=embd_type)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for layer in range(layers):
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
            name = prefix + name + ".weight"
            matrix_type, values = weights(name, rows, cols)
            writer.add_tensor(name, values, raw_dtype=matrix_type)
        print(f"  layer {layer + 1}/{layers} quantized", flush=True)

    write_out(writer)
    print(f"wrote {args.out}")


def add_family_metadata(writer, family, layers):
    """The keys convert_hf_to_gguf.py writes for the family, in its order
    (TextModel.set_gguf_parameters; Gemma3Model's own order for gemma3)."""
    writer.add_type("model")
    writer.add_name(f"random {family.model} shapes" + ("" if layers == family.layers else f", {layers} layers"))
    if family.arch == "gemma3":
        writer.add_context_length(family.context)
        writer.add_embedding_length(family.hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(family.ff)
        writer.add_head_count(family.heads)
        writer.add_layer_norm_rms_eps(family.eps)
        writer.add_key_length(family.head_dim)
        writer.add_value_length(family.head_dim)
        writer.add_rope_freq_base(family.rope_base)
        writer.add_sliding_window(family.sliding_window)
        writer.add_head_count_kv(family.kv_heads)
        return
    writer.add_block_count(layers)
    writer.add_context_length(family.context)
    writer.add_embedding_length(family.hidden)
    writer.add_feed_forward_length(family.ff)
    writer.add_head_count(family.heads)
    writer.add_head_count_kv(family.kv_heads)
    writer.add_rope_freq_base(family.rope_base)
    writer.add_layer_norm_rms_eps(family.eps)
    if family.key_length:
        writer.add_key_length(family.head_dim)
        writer.add_value_length(family.head_dim)


def write_family(path, family, quant, base, vocab, seed, layers=None):
    """Writes `family`'s model with random weights in the --quant mix, laid out
    as convert_hf_to_gguf.py and then llama-quantize lay it out."""
    layers = layers or family.layers
    writer = GGUFWriter(path, family.arch)
    add_family_metadata(writer, family, layers)
    copy_tokenizer(base, writer)
    # llama-quantize sets these two last, after the keys it copies.
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_file_type(QUANTS[quant][1])

    # Tied embeddings, as in all three models: no output.weight.
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{layer}.{name}" for layer in range(layers) for name in family.block_tensors]
    rng = np.random.default_rng(seed)
    counts = {}
    for name in sorted(names, key=quantize_order):
        shape = tensor_shape(family, name)
        if len(shape) == 1:
            writer.add_tensor(name, vector(rng, name, shape[0]))
            continue
        rows, cols = shape
        rows = rows or vocab
        qtype = tensor_type(quant, name, cols, layers)
        writer.add_tensor(name, matrix(rng, rows, cols, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    write_out(writer)
    mix = ", ".join(f"{count} {name}" for name, count in counts.items())
    print(f"wrote {path}: {family.model} shapes, {layers} layers, {quant} ({mix})", flush=True)


def sha256(path):
    """The file's SHA-256, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_all_families(folder, base, vocab, seed):
    """Writes TEST_FILES into folder, then prints their SHA-256 as sha256sum
    does (file names relative to the folder)."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for family, quant in TEST_FILES:
        names.append(f"{family}-{quant}.gguf")
        write_family(os.path.join(folder, names[-1]), FAMILIES[family], quant, base, vocab, seed)
    for name in names:
        print(f"{sha256(os.path.join(folder, name))}  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="GGUF whose tokenizer and chat template to copy")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="where to write the new GGUF")
    out.add_argument("--all-families", metavar="DIR",
                     help="write the family test files (" + ", ".join(f"{f}-{q}.gguf" for f, q in TEST_FILES)
                     + ") into DIR and print their SHA-256")
    parser.add_argument("--family", choices=["llama3-8b-shapes", *FAMILIES], default="llama3-8b-shapes")
    parser.add_argument("--quant", choices=sorted(QUANTS), default="q4_1",
                        help="quantization mix, as llama-quantize picks it (default q4_1)")
    parser.add_argument("--layers", type=int,
                        help="transformer layers (default 4 for llama3-8b-shapes, the model's own for a family)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="for llama3-8b-shapes")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    base, vocab = open_base(args.base)
    if args.all_families:
        write_all_families(args.all_families, base, vocab, args.seed)
    elif args.family == "llama3-8b-shapes":
        write_llama_shapes(args, base, vocab)
    else:
        write_family(args.out, FAMILIES[args.family], args.quant, base, vocab, args.seed, args.layers)


if __name__ == "__main__":
    main()
