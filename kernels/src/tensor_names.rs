//! GGUF tensor names as llama.cpp writes them (`gguf-py/gguf/constants.py`).
//! Every architecture names its tensors from this one list, so each name
//! is spelled once, here: the loaders and the byte accounting use the same
//! constants. A new architecture adds the names it needs beside these.

/// The token embedding, `[vocab, hidden]`; the first shard's.
pub(crate) const TOKEN_EMBEDDING: &str = "token_embd.weight";
/// The final norm, `[hidden]`; the last shard's.
pub(crate) const OUTPUT_NORM: &str = "output_norm.weight";
/// The vocabulary projection, `[vocab, hidden]`; absent when the model
/// ties it to the token embedding.
pub(crate) const OUTPUT: &str = "output.weight";
/// Llama 3.1 style per-frequency RoPE scaling factors, `[rope_dim / 2]`.
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

// Tensors of one layer, named by `in_layer`.

/// The norm before attention, `[hidden]`.
pub(crate) const ATTN_NORM: &str = "attn_norm";
/// The query projection, `[H*d, hidden]`.
pub(crate) const ATTN_Q: &str = "attn_q";
/// The key projection, `[KV*d, hidden]`.
pub(crate) const ATTN_K: &str = "attn_k";
/// The value projection, `[KV*d, hidden]`.
pub(crate) const ATTN_V: &str = "attn_v";
/// The attention output projection, `[hidden, H*d]`.
pub(crate) const ATTN_OUTPUT: &str = "attn_output";
/// Per-head RMS norm of the queries, `[d]` (Qwen 3, Gemma 3).
pub(crate) const ATTN_Q_NORM: &str = "attn_q_norm";
/// Per-head RMS norm of the keys, `[d]` (Qwen 3, Gemma 3).
pub(crate) const ATTN_K_NORM: &str = "attn_k_norm";
/// The norm of the attention's output before the residual add, `[hidden]`
/// (Gemma 2/3).
pub(crate) const POST_ATTENTION_NORM: &str = "post_attention_norm";
/// The norm before the MLP, `[hidden]`.
pub(crate) const FFN_NORM: &str = "ffn_norm";
/// The MLP's gate projection, `[ff, hidden]`.
pub(crate) const FFN_GATE: &str = "ffn_gate";
/// The MLP's up projection, `[ff, hidden]`.
pub(crate) const FFN_UP: &str = "ffn_up";
/// The MLP's down projection, `[hidden, ff]`.
pub(crate) const FFN_DOWN: &str = "ffn_down";

/// The norm of the MLP's output before the residual add, `[hidden]`
/// (Gemma 2/3).
pub(crate) const POST_FFN_NORM: &str = "post_ffw_norm";

/// The full GGUF name of `tensor` (one of the per-layer names above) in
/// layer `layer`: `blk.{layer}.{tensor}.weight`.
pub(crate) fn in_layer(layer: usize, tensor: &str) -> String {
    format!("blk.{layer}.{tensor}.weight")
}

/// The GGUF name of the bias of `tensor` in layer `layer`:
/// `blk.{layer}.{tensor}.bias`.
pub(crate) fn bias_in_layer(layer: usize, tensor: &str) -> String {
    format!("blk.{layer}.{tensor}.bias")
}
