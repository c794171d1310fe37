#!/usr/bin/env python3
"""Drive a running ringlet node with the official `openai` package.

Usage: openai_client.py BASE_URL MODEL. Exits non-zero on the first failed
check; prints "all checks passed" at the end.
"""

import sys

import json

import jsonschema
import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    assert model in ids, ids

    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content, whole
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    print(f"non-streaming: {choice.message.content!r} ({choice.finish_reason})")

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
    assert finish == choice.finish_reason, finish
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
    print(f"streaming: {len(pieces)} pieces, same text, usage {usage.completion_tokens} tokens")

    limited = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=3, temperature=0)
    assert limited.choices[0].finish_reason == "length" and limited.usage.completion_tokens == 3

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "no-such-model" in str(e), e

    try:
        client.chat.completions.create(model=model, messages=[])
        raise AssertionError("empty messages were accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e

    # Log probabilities, as the client parses them.
    scored = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    entries = scored.choices[0].logprobs.content
    assert len(entries) == scored.usage.completion_tokens, entries
    assert "".join(e.token for e in entries) == scored.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token, e
    streamed_entries = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
    ):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed_entries.extend(c.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in entries]
    print(f"logprobs: {[round(e.logprob, 3) for e in entries]}")

    try:
        client.chat.completions.create(model=model, messages=messages, logprobs=True, top_logprobs=21)
        raise AssertionError("top_logprobs of 21 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "top_logprobs" in str(e), e

    # Legacy completions, whole and streamed.
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
    )
    text = completion.choices[0].text
    assert text and completion.object == "text_completion", completion
    assert "".join(completion.choices[0].logprobs.tokens) == text
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == text, (pieces, text)
    print(f"completions: {text!r}")

    check_structured_output(client, model)
    check_tools(client, model)

    print("openai client: all checks passed")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def check_structured_output(client, model):
    """json_schema at temperature 1 for 20 seeds, and json_object."""
    for seed in range(20):
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Describe a person."}],
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
        )
        text = answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop", (seed, answer)
        jsonschema.validate(json.loads(text), PERSON)
    print(f"json_schema: 20 seeds at temperature 1.0 validate (last: {text})")
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": 'Give the capital of France as a JSON object with a key "capital".'}],
        temperature=0,
        max_tokens=80,
        response_format={"type": "json_object"},
    )
    assert answer.choices[0].finish_reason == "stop", answer
    assert isinstance(json.loads(answer.choices[0].message.content), dict), answer
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
        )
        raise AssertionError("an unsupported keyword was accepted")
    except openai.BadRequestError as e:
        assert "uniqueItems" in str(e) and e.body["param"] == "response_format.json_schema.schema", e


def check_tools(client, model):
    """A forced call, streamed deltas that assemble, then the round trip."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather", call
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    print(f"tool call: {call.function.name}({call.function.arguments})")

    # Streamed: the client's own accumulation of delta.tool_calls.
    with client.chat.completions.stream(
        model=model, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    ) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion()
    streamed_call = streamed.choices[0].message.tool_calls[0]
    assert streamed.choices[0].finish_reason == "tool_calls", streamed
    assert streamed_call.function.name == call.function.name, streamed_call
    assert json.loads(streamed_call.function.arguments) == json.loads(call.function.arguments), streamed_call

    messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})})
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40)
    assert answer.choices[0].message.content, answer
    print(f"tool round trip: {answer.choices[0].message.content!r}")

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"description": "x"}}]
        )
        raise AssertionError("a function without a name was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools[0].function.name", e.body


if __name__ == "__main__":
    main()
