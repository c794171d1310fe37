#!/usr/bin/env python3
"""llama.cpp's batched decoding, the anchor of `ringlet bench batch`.

Loads the GGUF with llama-cpp-python's low-level API and runs the given
prompts as sequences of one context: every prompt in one `llama_batch`
(logits for each one's last token), then one `llama_batch` per step with
the next token of every sequence (one sequence id each), greedy (argmax of
each sequence's logits), ignoring end-of-generation tokens so that every
sequence decodes the same number of tokens. Model loading is not timed.
Prints one JSON object: the end-to-end aggregate rate (completion tokens
over the time from the first prompt token to the last token, as a client
of `ringlet` measures it) and the decode-only aggregate rate.
"""

import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


@L.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp's loading log is not our output
    pass


def main() -> None:
    model_path, threads, prompts_file, decode_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    with open(prompts_file) as f:
        prompts = json.load(f)
    n = len(prompts)
    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model = L.llama_model_load_from_file(model_path.encode(), model_params)
    if not model:
        sys.exit(f"llama.cpp cannot load {model_path}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    prompt_tokens = sum(len(p) for p in prompts)
    ctx_params = L.llama_context_default_params()
    ctx_params.n_ctx = prompt_tokens + n * (decode_tokens + 8)
    ctx_params.n_batch = max(prompt_tokens, n)
    ctx_params.n_ubatch = 512
    ctx_params.n_seq_max = n
    ctx_params.n_threads = threads
    ctx_params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, ctx_params)
    if not ctx:
        sys.exit("llama.cpp cannot create a context")
    batch = L.llama_batch_init(max(prompt_tokens, n), 0, n)

    def add(token: int, position: int, sequence: int, logits: bool) -> None:
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    def argmax(i: int) -> int:
        # numpy's argmax returns the first of equal maxima, as greedy does.
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    start = time.perf_counter()
    batch.n_tokens = 0
    rows = []
    for s, prompt in enumerate(prompts):
        for p, token in enumerate(prompt):
            last = p == len(prompt) - 1
            if last:
                rows.append(batch.n_tokens)
            add(token, p, s, last)
    if L.llama_decode(ctx, batch) != 0:
        sys.exit("llama_decode failed on the prompts")
    tokens = [argmax(r) for r in rows]
    first = time.perf_counter()
    positions = [len(p) for p in prompts]
    generated = n
    for _ in range(decode_tokens - 1):
        batch.n_tokens = 0
        for s in range(n):
            add(tokens[s], positions[s], s, True)
            positions[s] += 1
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed")
        tokens = [argmax(s) for s in range(n)]
        generated += n
    end = time.perf_counter()
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(
        json.dumps(
            {
                "engine": f"llama.cpp (llama-cpp-python {L.__version__})",
                "sequences": n,
                "completion_tokens": generated,
                "aggregate_tok_s": generated / (end - start),
                "decode_aggregate_tok_s": (generated - n) / (end - first) if end > first else 0.0,
                "ttft_s": first - start,
            }
        )
    )


if __name__ == "__main__":
    main()
