#!/usr/bin/env python3
"""Make the golden log-probability reference with llama-cpp-python.

For each case of smollm2-135m.json (the same prompt tokens): decode greedily
with llama.cpp and, at each of the first TOKENS steps, record the chosen
token's log probability and the TOP likeliest tokens with theirs, as
llama-cpp-python computes them (`Llama.logits_to_logprobs`, a log-softmax
over the whole vocabulary). Writes smollm2-135m-logprobs.json, which
tests/api.rs compares ringlet's `logprobs` against.

Run once, by hand, when the reference must change:
    pip install llama-cpp-python==0.3.36 numpy
    python3 tests/golden/make_logprobs_reference.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import hashlib
import json
import os
import sys

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0
TOKENS = 8
TOP = 5


def main() -> None:
    path = sys.argv[1]
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "smollm2-135m.json")) as f:
        golden = json.load(f)
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    assert sha256 == golden["model"]["sha256"], "another model file than the golden text's"
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=1024,
        n_threads=2,
        n_threads_batch=2,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        logits_all=False,
        verbose=False,
    )
    cases = []
    for case in golden["cases"]:
        llm.reset()
        tokens = list(case["prompt_ids"])
        llm.eval(tokens)
        steps = []
        for _ in range(TOKENS):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)
            ).astype(np.float32)
            logprobs = llama_cpp.Llama.logits_to_logprobs(logits)
            chosen = int(np.argmax(logits))
            top = [int(i) for i in np.argsort(-logprobs, kind="stable")[:TOP]]
            steps.append(
                {
                    "token": chosen,
                    "text": llm.detokenize([chosen]).decode(errors="replace"),
                    "logprob": float(logprobs[chosen]),
                    "top": [
                        {
                            "token": i,
                            "text": llm.detokenize([i]).decode(errors="replace"),
                            "logprob": float(logprobs[i]),
                        }
                        for i in top
                    ],
                }
            )
            llm.eval([chosen])
        expected = case["output_ids"][:TOKENS]
        assert [s["token"] for s in steps] == expected, (case["name"], steps, expected)
        print(f"{case['name']}: {[round(s['logprob'], 4) for s in steps]}", file=sys.stderr)
        cases.append({"name": case["name"], "steps": steps})

    reference = {
        "model": golden["model"],
        "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "settings": {"greedy": True, "tokens": TOKENS, "top": TOP, "kv_cache": "f32"},
        "cases": cases,
    }
    out = os.path.join(here, "smollm2-135m-logprobs.json")
    with open(out, "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
