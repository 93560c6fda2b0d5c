"""`llmopt serve`'s OpenAI API driven by the official openai client (sync and async)
and raw HTTP: answers, streaming, logprobs, the sampling options, concurrency and
cancellation. Real SmolLM2 in fp32, a real uvicorn server on loopback
(tests/server_helpers.py); errors and protection are in test_server_errors.py, the
response caches and /metrics in test_server_caches.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server_helpers import MODEL, QUESTIONS, ask, client, engine, load, wait_idle

pytestmark = pytest.mark.real_model


# -- the API through the openai client --------------------------------------------------


def test_chat_streamed_and_not_agree_and_report_usage(live) -> None:
    c = client(live)
    whole = ask(c, QUESTIONS[0], max_tokens=24, extra_body={"cache": False})
    assert whole.object == "chat.completion" and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = ask(
        c,
        QUESTIONS[0],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"cache": False},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == choice.finish_reason and set(finishes[:-1]) == {None}


def test_completions_stop_n_seed_echo(live) -> None:
    c = client(live)
    out = c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, echo=True
    )
    assert out.object == "text_completion"
    assert out.choices[0].text.startswith("The capital of France is")
    # stop: the text ends before the stop string, which never appears
    full = (
        c.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    assert " 5" in full
    cut = c.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[" 5"]
    ).choices[0]
    assert cut.text == full[: full.index(" 5")] and cut.finish_reason == "stop"
    # n with a seed: n reproducible samples; the same seed gives the same n again
    kw = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"cache": False},
    )

    def texts(**over) -> list[str]:
        choices = c.completions.create(**(kw | over)).choices
        return [ch.text for ch in sorted(choices, key=lambda x: x.index)]

    a = texts()
    assert a == texts() and len(set(a)) > 1
    assert set(texts(seed=100)).isdisjoint(a)  # and another seed other samples
    # a batch of prompts, and token ids as a prompt
    ids = engine(live).tokenizer.encode("Hello")
    two = c.completions.create(
        model=MODEL, prompt=["Hello", "Bonjour"], max_tokens=4, temperature=0
    )
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and by_ids.choices[0].text == two.choices[0].text


def test_logprobs_match_the_reference_model(live, smollm_folder) -> None:
    """The first token's logprob equals transformers' log-softmax on the same prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    c = client(live)
    out = ask(c, QUESTIONS[2], max_tokens=3, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == sorted(
        (t.logprob for t in first.top_logprobs), reverse=True
    )
    assert first.token == first.top_logprobs[0].token  # greedy takes the top one

    tok = engine(live).tokenizer
    ids = tok.encode_chat([{"role": "user", "content": QUESTIONS[2]}])
    ref = AutoModelForCausalLM.from_pretrained(smollm_folder, torch_dtype=torch.float32)
    with torch.no_grad():
        lp = ref(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = lp.topk(3)
    assert [tok.decode([int(i)]) for i in top.indices] == [t.token for t in first.top_logprobs]
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-3)

    legacy = c.completions.create(
        model=MODEL, prompt="2 + 2 =", max_tokens=2, temperature=0, logprobs=2
    )
    lps = legacy.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == 2
    assert lps.text_offset[0] == 0


def test_models_and_health(live) -> None:
    assert [m.id for m in client(live).models.list()] == [MODEL]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


# -- sampling options ----------------------------------------------------------------------

HOT = {"temperature": 1.5, "seed": 3}  # a sample far from greedy, reproducibly


def completion_tokens(live, prompt: str, extra: dict | None = None, **kw) -> list[str]:
    """The tokens (as text) of a completion of `prompt`: temperature 0 unless given,
    32 tokens, extra_body `extra` (llmopt's own fields: top_k, min_p, repetition_penalty)."""
    out = client(live).completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=32,
        logprobs=1,
        extra_body={"cache": False, **(extra or {})},
        **({"temperature": 0} | kw),
    )
    return out.choices[0].logprobs.tokens


def test_top_k_and_min_p_reach_the_sampler(live) -> None:
    """top_k=1, or min_p=1, leaves only the likeliest token: at temperature 1.5 the
    answer is then the greedy one, which the same seed without them does not give."""
    greedy = ask(client(live), QUESTIONS[3], max_tokens=24).choices[0].message.content

    def hot(**extra) -> str:
        out = client(live).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTIONS[3]}],
            max_tokens=24,
            extra_body={"cache": False, **extra},
            **HOT,
        )
        return out.choices[0].message.content

    assert hot(top_k=1) == greedy
    assert hot(min_p=1.0) == greedy
    assert hot() != greedy  # the control: the same sampling, no filter


@pytest.mark.parametrize(
    "prompt,penalty",
    [
        ("Count: 1, 2, 3,", {"frequency_penalty": 2.0}),  # greedy repeats ", " 10 times
        ("Once upon a time", {"presence_penalty": 2.0}),  # and "," a few times
        ("Count: 1, 2, 3,", {"extra": {"repetition_penalty": 1.5}}),  # prompt tokens too
    ],
)
def test_penalties_turn_greedy_away_from_a_repeat(live, prompt, penalty) -> None:
    """Each penalty changes a greedy answer that repeats itself, and where the answers
    part the greedy token is one the penalty lowers: already generated (presence,
    frequency), or in the prompt or generated (repetition)."""
    greedy = completion_tokens(live, prompt)
    penalized = completion_tokens(live, prompt, **penalty)
    assert penalized != greedy
    i = next((i for i, (a, b) in enumerate(zip(greedy, penalized, strict=False)) if a != b), None)
    assert i is not None, "one answer is the other cut short"
    seen = set(greedy[:i])
    if "extra" in penalty:
        tok = engine(live).tokenizer
        seen |= {tok.decode([t]) for t in tok.encode(prompt)}
    assert greedy[i] in seen, (greedy[i], penalized[i])


# -- concurrency and cancellation ---------------------------------------------------------


def test_32_parallel_streams_equal_serial_runs(live) -> None:
    questions = (QUESTIONS * 2)[:32]
    serial = [
        ask(client(live), q, max_tokens=16, extra_body={"cache": False}).choices[0].message.content
        for q in questions
    ]

    async def one(c: openai.AsyncOpenAI, q: str) -> str:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            max_tokens=16,
            stream=True,
            extra_body={"cache": False},
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(one(c, q) for q in questions))

    assert asyncio.run(main()) == serial
    wait_idle(live)


def test_client_disconnect_cancels_and_frees_blocks(live) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", live.url + "/v1/chat/completions", json={**body, "stream": True}
    ) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert load(live).kv_blocks_used > 0
    wait_idle(live)  # well before 1500 tokens could have been generated
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1.0)
    wait_idle(live)
    assert ask(client(live), "Hi", max_tokens=2).choices[0].message.content  # still serving
