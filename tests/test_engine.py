"""The continuous-batching engine on the real model: batching, preemption and the
prefix cache change nothing in greedy output; cancelled requests free their blocks."""

from __future__ import annotations

import pytest

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel
from tests.conftest import TEST_DEVICE, run_to_completion, spy_preemptions

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three prime numbers.",
    "Why is the sky blue? Answer in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Name a famous painter.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture
def fp32(smollm_fp32: LoadedModel) -> LoadedModel:
    return smollm_fp32


def chat(loaded: LoadedModel, text: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return loaded.tokenizer.encode_chat(msgs)


def alone(loaded: LoadedModel, prompt: list[int], params=GREEDY) -> list[int]:
    engine = build_engine(loaded, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    return [t for d in engine.generate(prompt, params) for t in d.token_ids]


def test_batched_greedy_equals_each_request_alone(fp32) -> None:
    prompts = [chat(fp32, p) for p in PROMPTS]
    engine = build_engine(fp32, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    batched = run_to_completion(engine, prompts, GREEDY)
    assert batched == [alone(fp32, p) for p in prompts]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_forced_preemption_and_small_chunks_change_nothing(fp32) -> None:
    prompts = [chat(fp32, p) for p in PROMPTS]
    # Prompts of 35-41 tokens growing by 24: four 16-token blocks each. Seven blocks
    # admit two at a time, which then outgrow the cache: the scheduler must preempt
    # and recompute. Prefill runs in chunks of at most 9 tokens.
    config = EngineConfig(
        max_context=2048,
        kv_cache_memory=7 * 16 * 46080 / 1e9,
        max_num_seqs=8,
        max_num_batched_tokens=9,
    )
    engine = build_engine(fp32, config)
    assert engine.blocks.num_blocks == 7
    preempted = spy_preemptions(engine)
    assert run_to_completion(engine, prompts, GREEDY) == [alone(fp32, p) for p in prompts]
    assert preempted, "the workload was meant to force preemption"


def test_shared_system_prompt_hits_prefix_cache(fp32) -> None:
    system = "You are a meticulous assistant. " * 20
    engine = build_engine(fp32, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    first = list(engine.generate(chat(fp32, PROMPTS[0], system), GREEDY))[-1].stats
    second = list(engine.generate(chat(fp32, PROMPTS[1], system), GREEDY))[-1].stats
    assert first is not None and second is not None
    assert first.cached_prompt_tokens == 0
    shared = len(chat(fp32, "", system)) - 8  # the system part, give or take the tail
    assert second.cached_prompt_tokens >= (shared // 16) * 16 - 16
    assert engine.blocks.hit_tokens == second.cached_prompt_tokens


def test_abort_mid_batch_frees_blocks_and_others_finish(fp32) -> None:
    engine = build_engine(fp32, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    ids = [engine.add_request(chat(fp32, p), GREEDY) for p in PROMPTS[:3]]
    engine.step()
    engine.step()
    engine.abort(ids[1])
    assert engine.take(ids[1])[-1].finish_reason == "abort"
    finished = {}
    while engine.has_unfinished():
        for rid in engine.step():
            for d in engine.take(rid):
                if d.finish_reason:
                    finished[rid] = d.finish_reason
    assert set(finished) == {ids[0], ids[2]}
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_llm_offline_api(smollm_folder) -> None:
    from llmopt import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16)
    static = LLM(smollm_folder, kv_cache_memory=0.05, batching="static", max_num_seqs=2)
    assert static.engine.scheduler.config.batching == "static"
    one = static.generate(["What is the capital of France?", "Name a color."], params, chat=True)
    llm = LLM(smollm_folder, kv_cache_memory=0.05)
    outs = llm.generate(["What is the capital of France?", "Name a color."], params, chat=True)
    assert len(outs) == 2 and "Paris" in outs[0].text and outs[1].text
    assert [o.text for o in one] == [o.text for o in outs]  # same answers, any policy
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    # Blocks are cached once computed: the same prompt later reuses them.
    again = llm.generate("What is the capital of France?", params, chat=True)[0]
    assert again.text == outs[0].text and again.stats.cached_prompt_tokens == 32


def test_async_streams_equal_sync_and_cancel_frees_blocks(fp32) -> None:
    import asyncio

    from llmopt.engine.async_engine import AsyncEngine

    prompts = [chat(fp32, p) for p in PROMPTS[:4]]
    engine = build_engine(fp32, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    async_engine = AsyncEngine(engine)

    async def collect(p: list[int]) -> list[int]:
        return [t async for d in async_engine.stream(p, GREEDY) for t in d.token_ids]

    async def cancelled_early(p: list[int]) -> None:
        async for _ in async_engine.stream(p, SamplingParams(temperature=0, ignore_eos=True)):
            break  # the client goes away after its first token

    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled_early(prompts[0]))
        return results[:-1]

    try:
        streamed = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert streamed == [alone(fp32, p) for p in prompts]
    assert not engine.has_unfinished() and not engine.requests
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_async_step_failure_fails_requests_and_engine_recovers(fp32) -> None:
    import asyncio

    from llmopt.engine.async_engine import AsyncEngine

    engine = build_engine(fp32, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    async_engine = AsyncEngine(engine)
    real_step, calls = engine.step, {"n": 0}

    def flaky_step() -> list[str]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated failure in a step")
        return real_step()

    engine.step = flaky_step
    prompt = chat(fp32, PROMPTS[0])

    async def one() -> list[int]:
        return [t async for d in async_engine.stream(prompt, GREEDY) for t in d.token_ids]

    async def main() -> tuple[object, list[int]]:
        failed = await asyncio.gather(one(), return_exceptions=True)
        return failed[0], await one()

    try:
        failed, retried = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert isinstance(failed, RuntimeError) and "simulated failure" in str(failed)
    assert retried == alone(fp32, prompt)  # the engine thread survived
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_engine_process_streams_cancels_and_reports_its_death(fp32, smollm_folder) -> None:
    import asyncio

    from llmopt.engine.async_engine import AsyncEngine, GenerationError

    config = EngineConfig(
        model=str(smollm_folder),
        device=TEST_DEVICE.type,
        dtype="float32",
        max_context=2048,
        kv_cache_memory=0.05,
        threads=2,
    )
    engine = AsyncEngine.spawn(config)
    prompts = [chat(fp32, p) for p in PROMPTS[:3]]

    async def collect(p: list[int]) -> list[int]:
        return [t async for d in engine.stream(p, GREEDY) for t in d.token_ids]

    async def cancelled_early(p: list[int]) -> None:
        async for _ in engine.stream(p, SamplingParams(temperature=0, ignore_eos=True)):
            break

    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled_early(prompts[0]))
        for _ in range(100):  # the abort lands before the child's next step
            if engine.load().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        return results[:-1]

    try:
        assert asyncio.run(main()) == [alone(fp32, p) for p in prompts]
        assert engine.load().kv_blocks_used == 0 and engine.load().running == 0

        async def doomed() -> None:
            params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
            async for _ in engine.stream(prompts[0], params):
                engine._thread.process.kill()  # the engine process dies mid-stream

        with pytest.raises(GenerationError, match="engine process exited"):
            asyncio.run(doomed())
        with pytest.raises(GenerationError, match="engine process exited"):
            asyncio.run(collect(prompts[1]))  # later requests fail at once, too
    finally:
        engine.shutdown()


def test_engine_process_start_failure_is_one_clear_error(tmp_path) -> None:
    from llmopt.engine.async_engine import AsyncEngine
    from llmopt.errors import LlmoptError

    config = EngineConfig(
        model=str(tmp_path / "nothing"), device="cpu", dtype="float32", kv_cache_memory=0.05
    )
    with pytest.raises(LlmoptError) as e:
        AsyncEngine.spawn(config)
    assert "nothing" in e.value.message
