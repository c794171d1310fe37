#!/usr/bin/env python3
"""Make the golden greedy-decoding reference with llama.cpp.

For each fixed chat below: render the GGUF's own chat template (Jinja2 with
trim_blocks/lstrip_blocks, as transformers and llama-cpp-python do), tokenize
it with llama.cpp (special tokens parsed), and decode 32 tokens greedily.
The token ids are written to smollm2-135m.json (and a long chat's to
smollm2-135m-long.json), which the kernels' golden test compares against
token for token. The SHA-256 of llama.cpp's whole
logit vector after the prompt (49,152 little-endian f32) is recorded too:
ringlet reproduces ggml's arithmetic, so those bytes match exactly.

Run once, by hand, when the reference must change:
    pip install llama-cpp-python==0.3.36 jinja2
    python3 tests/golden/make_reference.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import hashlib
import json
import os
import sys

import jinja2
import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0
TOKENS = 32

CASES = [
    {
        "name": "rainbow",
        "messages": [{"role": "user", "content": "Explain how a rainbow forms."}],
    },
    {
        "name": "poem_with_system",
        "messages": [
            {"role": "system", "content": "You are a poet who writes in short lines."},
            {"role": "user", "content": "Write a poem about the sea at night."},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "List three famous places to visit there, with one sentence each."},
        ],
    },
]

# Written to smollm2-135m-long.json, for the kernels' golden test alone (the
# node tests run the short chats through rings and KV budgets sized for them).
LONG_CASES = [
    {
        # 824 prompt tokens: the KV cache spans 13 of ringlet's 64-token
        # pages, and llama.cpp reads the prompt in two batches of up to 512.
        "name": "long_summary",
        "messages": [
            {
                "role": "user",
                "content": "Summarize the following notes in three sentences.\n\n"
                + " ".join(
                    f"Note {i}: the {part} of the old lighthouse was repaired in year {1900 + 7 * i}, "
                    f"after a storm that lasted {i % 5 + 2} days and cost the town {100 * i + 50} crowns."
                    for i, part in enumerate(
                        ["lamp", "stairs", "door", "roof", "lens", "bell", "gallery", "windows",
                         "foundation", "railing", "clock", "chimney", "cellar", "flagpole", "wall",
                         "garden", "gate", "shed", "path", "dock"]
                    )
                ),
            },
        ],
    },
]


def main() -> None:
    path = sys.argv[1]
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=1024,
        n_threads=2,
        n_threads_batch=2,
        # f32 keys and values, as ringlet keeps them, so that both engines
        # round the attention inputs the same way.
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )
    template_source = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(template_source)
    eos_text = llm.detokenize([llm.token_eos()], special=True).decode()

    for file, group in (("smollm2-135m.json", CASES), ("smollm2-135m-long.json", LONG_CASES)):
        cases = [reference_case(llm, template, eos_text, case) for case in group]
        reference = {
            "model": {"file": os.path.basename(path), "sha256": sha256},
            "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
            "settings": {"greedy": True, "tokens": TOKENS, "kv_cache": "f32", "threads": 2},
            "cases": cases,
        }
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
        with open(out, "w") as f:
            json.dump(reference, f, indent=1)
            f.write("\n")
        print(f"wrote {out}", file=sys.stderr)


def reference_case(llm, template, eos_text: str, case: dict) -> dict:
    """One chat's prompt, its logits' SHA-256 and top 5, and TOKENS greedy tokens."""
    prompt = template.render(
        messages=case["messages"], add_generation_prompt=True, bos_token="", eos_token=eos_text
    )
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(prompt_ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    logits = logits.astype("<f4").copy()
    logits_sha256 = hashlib.sha256(logits.tobytes()).hexdigest()
    top = [[int(i), float(logits[i])] for i in np.argsort(-logits)[:5]]
    llm.reset()
    output_ids = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        output_ids.append(token)
        if len(output_ids) == TOKENS:
            break
    text = llm.detokenize(output_ids).decode(errors="replace")
    print(f"{case['name']}: {text!r}", file=sys.stderr)
    return {
        "name": case["name"],
        "messages": case["messages"],
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "prompt_logits_sha256": logits_sha256,
        "prompt_logits_top5": top,
        "output_ids": output_ids,
        "output_text": text,
    }


if __name__ == "__main__":
    main()
