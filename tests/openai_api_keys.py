#!/usr/bin/env python3
"""Check a ringlet node's API keys with the official `openai` package.

Usage: openai_api_keys.py BASE_URL MODEL KEY, against a node started with
`--api-key KEY`. Exits non-zero on the first failed check; prints "all
checks passed" at the end.
"""

import sys
import urllib.request

import openai


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def refused(base_url: str, key: str | None, error: type) -> str:
    """The refusal of a request with `key`, or (None) with no Authorization
    header at all (the client insists on a key, so it gets a placeholder
    and the request omits the header)."""
    omit = {"Authorization": openai.Omit()} if key is None else None
    try:
        client(base_url, key or "placeholder").models.list(extra_headers=omit)
    except error as e:
        return str(e)
    raise AssertionError(f"key {key!r} was not refused with {error.__name__}")


def main() -> None:
    base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]

    # The health check needs no key.
    with urllib.request.urlopen(f"{base_url}/healthz", timeout=30) as health:
        assert health.status == 200, health.status

    # No key: no Authorization header at all.
    message = refused(base_url, None, openai.AuthenticationError)
    assert "requires an API key" in message, message
    print(f"missing key: {message}")

    message = refused(base_url, "not-the-key", openai.AuthenticationError)
    assert "API key is wrong" in message, message
    print(f"wrong key: {message}")

    right = client(base_url, key)
    assert model in [m.id for m in right.models.list().data]
    answer = right.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=8,
    )
    assert answer.choices[0].message.content, answer
    print(f"right key: {answer.choices[0].message.content!r}")

    # Guessing is stopped: after ten wrong keys in a minute (a missing one
    # guesses nothing), even the right key gets 429 from this address for
    # the rest of the minute.
    for _ in range(9):
        refused(base_url, "guess", openai.AuthenticationError)
    message = refused(base_url, key, openai.RateLimitError)
    assert "Too many failed API key attempts" in message, message
    print(f"after ten failures: {message}")

    print("all checks passed")


if __name__ == "__main__":
    main()
