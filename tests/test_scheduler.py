"""Scheduler and KV block manager: invariants under random workloads, prefix reuse,
preemption, chunked prefill, copy-on-write."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.engine.block_manager import HOLE, BlockManager
from llmopt.engine.config import POLICIES, EngineConfig
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import Scheduler
from llmopt.engine.sequence import Sequence, SequenceStatus


def config(
    max_num_seqs: int, max_num_batched_tokens: int, batching: str = "continuous", **kw: float
) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        batching=batching,
        **kw,
    )


def seq(rid: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence.from_prompt(rid, prompt, SamplingParams(max_tokens=max_tokens))


def check_invariants(bm: BlockManager, sched: Scheduler, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for s in live:
        # given back behind the window: the leading entries, and only those
        assert s.block_table[: s.released_blocks] == [HOLE] * s.released_blocks
        for b in s.block_table[s.released_blocks :]:
            assert b != HOLE
            refs[b] += 1
        if bm.window is not None and s.block_table:  # what the next position reads is held
            first = max(0, s.num_computed_tokens + 1 - bm.window) // bm.block_size
            assert s.released_blocks <= first
    assert refs == [b.ref_count for b in bm.blocks], "reference counts drifted"
    free, evictable = set(bm.free_ids), set(bm.evictable)
    assert not free & evictable
    for b in bm.blocks:
        assert (b.ref_count == 0) == (b.id in free or b.id in evictable)
        assert (b.id in evictable) <= (b.hash is not None)
    assert len(free) + len(evictable) + sum(r > 0 for r in refs) == bm.num_blocks
    assert all(bm.blocks[bid].hash == h for h, bid in bm.cached.items())
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        assert s.num_computed_tokens <= s.num_tokens
    for s in sched.waiting:
        assert s.status is SequenceStatus.WAITING and not s.block_table


def run_step(sched: Scheduler, rng: random.Random, done: list[Sequence]) -> int:
    """What the engine does with a step: run it, sample for sequences that caught up."""
    step = sched.schedule()
    assert step.total_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    sched.computed(step)
    for s in step.seqs:
        if s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 0:
            s.append(rng.randrange(50))
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s)
                done.append(s)
    return step.total_tokens


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    outputs=st.lists(st.integers(1, 20), min_size=12, max_size=12),
    num_blocks=st.integers(6, 40),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    aborts=st.lists(st.integers(0, 11), max_size=4),
    seed=st.integers(0, 1000),
    policy=st.sampled_from(POLICIES),
    prefix_cache=st.booleans(),
    window=st.sampled_from([None, 1, 5, 16]),
)
def test_random_workloads_keep_invariants_and_leak_nothing(
    lengths,
    outputs,
    num_blocks,
    block_size,
    budget,
    max_seqs,
    aborts,
    seed,
    policy,
    prefix_cache,
    window,
) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, prefix_cache, window)
    sched = Scheduler(config(max_seqs, budget, policy, max_wait_s=0), bm)
    shared = [rng.randrange(50) for _ in range(30)]  # common prefix, to exercise the cache
    seqs, done = [], []
    for i, n in enumerate(lengths):
        prompt = (shared + [rng.randrange(50) for _ in range(n)])[: max(n, 1)]
        s = seq(str(i), prompt, outputs[i])
        if bm.blocks_for(s.num_tokens + s.params.max_tokens) > num_blocks:
            continue  # could never fit; the engine refuses these up front
        sched.add(s)
        seqs.append(s)
    for step_no in range(2000):
        if not sched.has_work():
            break
        if step_no in aborts:
            victim = rng.choice(seqs)
            sched.abort(victim.request_id)
        ran = run_step(sched, rng, done)
        assert ran > 0 or not sched.has_work(), "no progress"
        live = [s for s in seqs if s.status is not SequenceStatus.FINISHED]
        check_invariants(bm, sched, live)
    assert not sched.has_work()
    assert bm.num_free_blocks == num_blocks, "blocks leaked"
    assert all(s.num_output_tokens == s.params.max_tokens for s in done)


def test_blocks_behind_a_sliding_window_are_given_back() -> None:
    """With every layer reading its last 8 keys, a long generation holds the blocks of
    its window (and the one being filled), not one per 4 tokens; the blocks it gave back
    stay in the prefix cache, and a request with the same prompt still hits them."""
    bm = BlockManager(64, 4, window=8)
    sched = Scheduler(config(4, 64), bm)
    prompt = list(range(20))
    s = seq("a", prompt, max_tokens=40)
    sched.add(s)
    rng, done = random.Random(0), []
    held = []
    while sched.has_work():
        run_step(sched, rng, done)
        held.append(len(s.block_table) - s.released_blocks)
        check_invariants(bm, sched, [s] if s.status is not SequenceStatus.FINISHED else [])
    assert done == [s] and s.num_output_tokens == 40
    assert max(held[1:]) <= 8 // 4 + 2  # after the prompt's step: window + the open block
    assert bm.num_free_blocks == 64
    again = seq("b", prompt, max_tokens=1)
    assert bm.allocate(again) and again.num_cached_tokens == 16  # 4 full blocks of 20


def test_shared_system_prompt_hits_the_prefix_cache() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(config(8, 256), bm)
    system = list(range(100, 140))  # 40 tokens = 10 full blocks
    a = seq("a", [*system, 1, 2, 3])
    sched.add(a)
    run_step(sched, random.Random(0), [])
    b = seq("b", [*system, 7, 8])
    sched.add(b)
    sched.schedule()
    assert b.num_cached_tokens == 40 and b.block_table[:10] == a.block_table[:10]
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:10])


def test_cache_survives_the_request_and_is_evicted_lru() -> None:
    bm = BlockManager(6, 4)
    sched = Scheduler(config(4, 64), bm)
    first = seq("a", list(range(12)), max_tokens=1)
    sched.add(first)
    run_step(sched, random.Random(0), [])  # prefill, sample, finish
    assert first.status is SequenceStatus.FINISHED and len(bm.evictable) == 3
    again = seq("b", [*range(12), 99], max_tokens=1)
    sched.add(again)
    sched.schedule()
    assert again.num_cached_tokens == 12  # three blocks straight from the cache
    sched.finish(again)
    # A request that needs every block evicts the cached ones instead of failing.
    big = seq("c", list(range(200, 223)), max_tokens=1)
    sched.add(big)
    sched.schedule()
    assert len(big.block_table) == 6 and not bm.cached


def test_multi_turn_reuses_previous_turn() -> None:
    bm = BlockManager(32, 4)
    sched = Scheduler(config(4, 64), bm)
    rng = random.Random(1)
    turn1 = seq("t1", list(range(10)), max_tokens=8)
    sched.add(turn1)
    while sched.has_work():
        run_step(sched, rng, [])
    history = turn1.token_ids  # prompt + answer, as the next turn's template would repeat it
    turn2 = seq("t2", [*history, 500, 501])
    sched.add(turn2)
    sched.schedule()
    assert turn2.num_cached_tokens == (len(history) // 4) * 4


def test_chunked_prefill_does_not_stall_decodes() -> None:
    bm = BlockManager(64, 4)
    sched = Scheduler(config(4, 8), bm)
    rng = random.Random(0)
    short = seq("short", [1, 2, 3], max_tokens=50)
    sched.add(short)
    run_step(sched, rng, [])
    long = seq("long", list(range(100)), max_tokens=1)
    sched.add(long)
    for _ in range(5):
        step = sched.schedule()
        sched.computed(step)
        assert short in step.seqs and step.num_tokens[step.seqs.index(short)] == 1
        assert step.total_tokens <= 8
        for s in step.seqs:
            if s.num_uncomputed_tokens == 0:
                s.append(0)
    assert 0 < long.num_computed_tokens < 100  # prefilled in chunks between decodes


def test_preemption_frees_blocks_and_requeues_first() -> None:
    bm = BlockManager(4, 2)
    sched = Scheduler(config(4, 64), bm)
    a, b = seq("a", [1, 2, 3, 4], max_tokens=8), seq("b", [5, 6, 7, 8], max_tokens=8)
    sched.add(a)
    sched.add(b)
    rng = random.Random(0)
    run_step(sched, rng, [])  # both prefilled: 2 blocks each, all 4 used
    step = sched.schedule()  # a needs a third block: b (newest) is preempted
    assert step.preempted == [b] and b.status is SequenceStatus.WAITING
    assert sched.waiting[0] is b and not b.block_table and b.num_computed_tokens == 0
    assert len(b.token_ids) == 5  # its generated token is kept and will be recomputed
    assert step.seqs == [a] and len(a.block_table) == 3


def test_shared_prefix_blocks_are_never_written() -> None:
    """No copy-on-write exists: a block shared through the prefix cache must lie wholly
    before the tokens its sharers still compute."""
    bm = BlockManager(16, 4)
    first = seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert bm.allocate(first)
    first.num_computed_tokens = first.num_tokens
    bm.register_full_blocks(first)
    second = seq("b", [1, 2, 3, 4, 5, 6, 7, 8], 4)  # the last token ends a cached block
    assert bm.allocate(second)
    assert second.num_computed_tokens == 4  # block two is not shared: its last token runs
    written = second.block_table[second.num_computed_tokens // 4 :]
    assert all(bm.blocks[b].ref_count == 1 for b in written)
    assert second.block_table[0] == first.block_table[0]
    assert bm.blocks[first.block_table[0]].ref_count == 2


def test_static_and_dynamic_batches_run_to_completion() -> None:
    for policy in ("static", "dynamic"):
        bm = BlockManager(64, 4)
        sched = Scheduler(config(2, 64, policy, max_wait_s=60), bm)
        sched.add(seq("a", [1, 2, 3], max_tokens=3))
        if policy == "static":
            assert not sched.schedule().seqs  # waits for a full batch of two
        sched.add(seq("b", [4, 5], max_tokens=3))
        sched.add(seq("c", [6, 7], max_tokens=3))
        first = sched.schedule()
        assert {s.request_id for s in first.seqs} == {"a", "b"}
        rng, done = random.Random(0), []
        sched.computed(first)
        for s in first.seqs:
            s.append(0)
        while len(done) < 2:
            step = sched.schedule()
            assert "c" not in {s.request_id for s in step.seqs}  # no admission mid-batch
            sched.computed(step)
            for s in step.seqs:
                s.append(rng.randrange(9))
                if s.num_output_tokens >= s.params.max_tokens:
                    sched.finish(s)
                    done.append(s)
        # Dynamic takes the lone request now; static waits for a full batch (or max_wait_s).
        expected = ["c"] if policy == "dynamic" else []
        assert [s.request_id for s in sched.schedule().seqs] == expected


def test_a_prefix_in_flight_is_computed_once() -> None:
    """Requests that arrive together with one long shared prompt: the first computes it,
    the others wait for its blocks and then take them from the cache."""
    bm = BlockManager(num_blocks=64, block_size=16)
    sched = Scheduler(config(8, 32), bm)
    shared = list(range(100, 164))  # 4 full blocks
    seqs = [seq(f"r{i}", [*shared, 900 + i]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    rng, done = random.Random(0), []
    first = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["r0"]  # the others wait for r0's blocks
    sched.computed(first)
    while seqs[0].num_uncomputed_tokens:
        sched.computed(sched.schedule())
    seqs[0].append(1)
    while len(sched.running) < 3:
        run_step(sched, rng, done)
    assert [s.num_cached_tokens for s in seqs[1:]] == [64, 64]
    assert bm.hit_tokens == 128 and bm.miss_tokens == 65 + 1 + 1
    # Without the prefix cache nothing is held back.
    bm2 = BlockManager(num_blocks=64, block_size=16, prefix_cache=False)
    sched2 = Scheduler(config(8, 256), bm2)
    for i in range(3):
        sched2.add(seq(f"s{i}", [*shared, 900 + i]))
    assert len(sched2.schedule().seqs) == 3
