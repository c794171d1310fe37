#!/usr/bin/env python3
"""Make the llama.cpp references for the model families beyond llama.

For each model file named on the command line (NAME=PATH): the prompt of
each fixed chat (rendered with the file's own template, or Gemma's turns
for a Gemma file that carries none), its token ids from llama.cpp, the ten
largest logits after the prompt, 16 greedy tokens, and llama.cpp's ids for
a few plain texts (the tokenizer check). Written to families.json beside
this script, with each file's SHA-256.

Where the bits come from: ringlet reproduces llama.cpp's AVX-512 build;
a reference made on a machine without AVX-512 (as on the 2-core CI hosts)
differs from it in the last bits of every f32 reduction, so the test holds
ringlet to these logits within a stated tolerance and to the same top
tokens, not to a hash. Regenerate on an AVX-512 host to tighten it.

    pip install llama-cpp-python==0.3.36 jinja2 numpy
    python3 tests/golden/make_family_reference.py gemma3=PATH/gemma-3-270m-q4_k_m.gguf \\
        qwen2-q8_0=... qwen2-q4_k_m=... qwen3-q8_0=... qwen3-q4_k_m=...

With --long first (and the Gemma file alone), the long chat that runs past
Gemma 3's sliding window, written to families-long.json:

    python3 tests/golden/make_family_reference.py --long gemma3=PATH/gemma-3-270m-q4_k_m.gguf
"""

import hashlib
import json
import os
import sys

import jinja2
import llama_cpp
import numpy as np
# With --long: the default model's long chat, about 800 prompt tokens, past
# Gemma 3's 512-token sliding window; written to families-long.json.
from make_reference import LONG_CASES  # beside this script

TOKENS = 16
TOP = 10

GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
    " + '\\n' + m['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

CHATS = [
    {"name": "rainbow", "messages": [{"role": "user", "content": "Explain how a rainbow forms."}]},
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "List three famous places to visit there."},
        ],
    },
]

TEXTS = ["Hello world", "  indented\n\tcode()", "naïve café 日本語 🙂", "x\n\ny", "It's 3.14159!"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reference(name, path, long=False):
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=1024, n_threads=2, n_threads_batch=2,
        type_k=0, type_v=0, flash_attn=False, verbose=False,  # f32 K/V, as ringlet keeps them
    )
    source = llm.metadata.get("tokenizer.chat_template") or GEMMA_TURNS
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(source)
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" else ""
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    chats = []
    for chat in LONG_CASES if long else CHATS:
        prompt = template.render(messages=chat["messages"], add_generation_prompt=True, bos_token=bos, eos_token=eos)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
        top = [[int(i), float(logits[i])] for i in np.argsort(-logits, kind="stable")[:TOP]]
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) == TOKENS:
                break
        chats.append({"name": chat["name"], "messages": chat["messages"], "prompt": prompt, "prompt_ids": ids,
                      "prompt_logits_top": top, "output_ids": out})
        print(f"{name}/{chat['name']}: {llm.detokenize(out).decode(errors='replace')!r}", file=sys.stderr)
    if long:
        # The chats alone: the short reference checks the prefix and texts.
        return {"file": os.path.basename(path), "sha256": sha256(path), "chats": chats, "texts": []}
    # The first four prompt tokens alone: llama.cpp's matrix kernels for
    # fewer than four rows are the ones ringlet follows, so these logits
    # are compared bit for bit (all of them, by hash).
    prefix = chats[0]["prompt_ids"][:4]
    llm.reset()
    llm.eval(prefix)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).astype("<f4").copy()
    prefix_case = {"prompt_ids": prefix, "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest()}
    texts = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in TEXTS]
    return {"file": os.path.basename(path), "sha256": sha256(path), "chats": chats, "prefix": prefix_case, "texts": texts}


def main():
    long = sys.argv[1:2] == ["--long"]
    models = {}
    for arg in sys.argv[2 if long else 1:]:
        name, path = arg.split("=", 1)
        models[name] = reference(name, path, long)
    with open("/proc/cpuinfo") as f:
        cpu = "with" if " avx512f" in f.read() else "without"
    out = {
        "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, CPU {cpu} AVX-512",
        "settings": {"greedy": True, "tokens": TOKENS, "kv_cache": "f32", "threads": 2},
        "models": models,
    }
    file = "families-long.json" if long else "families.json"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), file)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
