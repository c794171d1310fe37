#!/usr/bin/env python3
"""Drive a running ringlet node with the official `openai` package.

Usage: openai_client.py BASE_URL MODEL. Exits non-zero on the first failed
check; prints "all checks passed" at the end.
"""

import sys

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

    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
