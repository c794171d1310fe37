#!/usr/bin/env python3
"""One llama.cpp benchmark round for `ringlet bench`.

Loads the GGUF with llama-cpp-python, feeds the exact prompt token ids it is
given, then decodes greedily, and prints one JSON object: time to first
token, prefill and decode rates, and the process's peak RSS. Model loading
is not timed. Greedy decoding runs through llama.cpp's own sampler (top-k 1)
and ignores end-of-generation tokens so both engines do the same work.
"""

import json
import resource
import sys
import time

import llama_cpp


def main() -> None:
    model_path, threads, prompt_file, decode_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    with open(prompt_file) as f:
        prompt = json.load(f)
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=len(prompt) + decode_tokens + 16,
        n_batch=max(len(prompt), 32),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.reset()
    start = time.perf_counter()
    stamps = []
    for _token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == decode_tokens + 1:
            break
    ttft = stamps[0] - start
    decode_seconds = stamps[-1] - stamps[0]
    print(
        json.dumps(
            {
                "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                "ttft_s": ttft,
                "prefill_tok_s": len(prompt) / ttft,
                "decode_tok_s": (len(stamps) - 1) / decode_seconds if decode_seconds > 0 else 0.0,
                "generated": len(stamps),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
