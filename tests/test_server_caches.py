"""`llmopt serve`'s response caches (exact and semantic) and its /metrics, by value,
speculative decoding's counters included."""

from __future__ import annotations

import pytest

from llmopt.config import ServerConfig
from tests.conftest import EXTRACTIVE
from tests.server_helpers import MODEL, ask, client, engine, load, metrics, start, wait_idle

pytestmark = pytest.mark.real_model


# -- response caches ----------------------------------------------------------------------


GENERATED = "llmopt_generation_tokens_total"
# vLLM's names: verification rounds, tokens drafted, drafts accepted.
SPEC_COUNTERS = [
    f"llmopt_spec_decode_num_{n}_total" for n in ("drafts", "draft_tokens", "accepted_tokens")
]
EXACT_HITS = 'llmopt_response_cache_total{kind="exact",result="hit"}'
EXACT_MISSES = 'llmopt_response_cache_total{kind="exact",result="miss"}'


def test_exact_cache_hit_skips_the_engine(live) -> None:
    c = client(live)
    q = "Name one color of the rainbow."
    first = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12
    )
    assert first.headers["x-llmopt-cache"] == "miss"
    before = metrics(live.url)
    again = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12
    )
    assert again.headers["x-llmopt-cache"] == "hit-exact"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    # streamed like a live answer
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": q}],
        temperature=0,
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == (
        first.parse().choices[0].message.content
    )
    hits = metrics(live.url)
    assert hits[GENERATED] == before[GENERATED]  # the engine was never asked
    assert hits[EXACT_HITS] == before.get(EXACT_HITS, 0) + 2
    # opt-out, other settings and sampled requests are not served from the cache
    for kw in ({"extra_body": {"cache": False}}, {"max_tokens": 11}):
        r = c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            **({"max_tokens": 12} | kw),
        )
        assert r.headers["x-llmopt-cache"] == ("off" if "extra_body" in kw else "miss")
    sampled = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0.9, max_tokens=4
    )
    assert sampled.headers["x-llmopt-cache"] == "off"
    after = metrics(live.url)
    # Those three ran on the engine; only the max_tokens=11 one was looked up (a miss).
    usage = first.parse().usage.completion_tokens
    assert after[GENERATED] > hits[GENERATED] + usage
    assert (after[EXACT_HITS], after[EXACT_MISSES]) == (hits[EXACT_HITS], hits[EXACT_MISSES] + 1)


def test_semantic_cache_hits_paraphrase_and_misses_unrelated(smollm_fp32) -> None:
    from llmopt.server.embedder import MiniLMEmbedder

    config = ServerConfig(semantic_threshold=0.9)
    with start(smollm_fp32, config, MiniLMEmbedder()) as s:
        c = client(s)

        def cached(q: str) -> tuple[str, str]:
            r = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=10
            )
            return r.headers["x-llmopt-cache"], r.parse().choices[0].message.content

        header, answer = cached("What is the capital of France?")
        assert header == "miss"
        assert cached("What's the capital city of France?") == ("hit-semantic", answer)
        assert cached("How do I bake bread at home?")[0] == "miss"
        counts = metrics(s.url)
        assert counts['llmopt_response_cache_total{kind="semantic",result="hit"}'] == 1
        assert counts['llmopt_response_cache_total{kind="semantic",result="miss"}'] == 2


def test_metrics_count_what_a_request_did(live) -> None:
    """One request's numbers in every series: tokens, the request counter, one TTFT and
    one end-to-end observation, a token gap for each token after the first, prompt
    tokens looked up in the prefix cache; the engine's state at rest."""
    wait_idle(live)
    before = metrics(live.url)
    out = ask(client(live), "Hello!", max_tokens=5, extra_body={"cache": False, "ignore_eos": True})
    wait_idle(live)
    after = metrics(live.url)

    def grew(series: str) -> float:
        return after[series] - before.get(series, 0.0)

    prompt, completion = out.usage.prompt_tokens, out.usage.completion_tokens
    assert completion == 5
    assert grew("llmopt_prompt_tokens_total") == prompt
    assert grew(GENERATED) == completion
    assert grew('llmopt_requests_total{endpoint="chat",outcome="ok"}') == 1
    assert grew("llmopt_time_to_first_token_seconds_count") == 1
    assert grew("llmopt_inter_token_latency_seconds_count") == completion - 1
    assert grew("llmopt_e2e_request_latency_seconds_count") == 1
    assert grew('llmopt_e2e_request_latency_seconds_bucket{le="+Inf"}') == 1
    ttft, e2e = (
        grew("llmopt_time_to_first_token_seconds_sum"),
        grew("llmopt_e2e_request_latency_seconds_sum"),
    )
    assert 0 < ttft <= e2e
    looked_up = grew("llmopt_prefix_cache_hit_tokens_total") + grew(
        "llmopt_prefix_cache_miss_tokens_total"
    )
    assert looked_up == prompt
    state = load(live)
    assert after["llmopt_kv_blocks_total"] == state.kv_blocks_total > 0
    tokens = after["llmopt_kv_cache_tokens_total"]
    assert tokens == state.kv_blocks_total * state.kv_block_size
    assert tokens == engine(live).kv_capacity_tokens
    assert after["llmopt_kv_cache_tokens_used"] == 0
    assert after["llmopt_kv_blocks_used"] == after["llmopt_requests_running"] == 0
    assert after["llmopt_requests_waiting"] == 0
    assert [grew(name) for name in SPEC_COUNTERS] == [0, 0, 0]  # no speculation here


def test_speculative_server_counts_drafts_and_answers_as_plain_decoding(live, smollm_fp32) -> None:
    """A server whose engine drafts with prompt lookup: the same greedy answer as plain
    decoding, streamed and not, and /metrics counts its rounds, drafts and accepted
    drafts, from each request's stats as it finishes."""
    plain = ask(client(live), EXTRACTIVE, max_tokens=24, extra_body={"cache": False})
    with start(smollm_fp32, speculative="ngram", speculative_adaptive=False) as s:
        c = client(s)
        whole = ask(c, EXTRACTIVE, max_tokens=24, extra_body={"cache": False})
        counts = metrics(s.url)
        stream = ask(c, EXTRACTIVE, max_tokens=24, stream=True, extra_body={"cache": False})
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        wait_idle(s)
        twice = metrics(s.url)
    answer = plain.choices[0].message.content
    assert whole.choices[0].message.content == text == answer and "lazy dog" in answer
    rounds, drafted, accepted = (counts[name] for name in SPEC_COUNTERS)
    assert rounds > 0 and drafted >= rounds and 0 < accepted <= drafted
    # The same prompt again drafts and accepts the same (greedy, drafts from the prompt).
    assert [twice[name] for name in SPEC_COUNTERS] == [2 * rounds, 2 * drafted, 2 * accepted]
