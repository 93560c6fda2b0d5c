"""Speculative decoding: exact at temperature 0 (token for token the output of plain
decoding, on the real packed model, for every k, under batching, preemption, stop
strings and abort), distributed as plain sampling above it (chi-square), the prefix
cache holding only accepted tokens, and the drafter and controller on their own."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console

from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.sampler import make_generator, probabilities, verify_token
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import Sequence
from llmopt.engine.spec.adaptive import PROBE_EVERY, SpecController, StepCost
from llmopt.engine.spec.drafter import Draft, Drafter
from llmopt.engine.spec.ngram import NgramDrafter
from llmopt.errors import UsageError
from llmopt.loader.load import LoadedModel, load_model
from llmopt.store.store import Store
from tests.conftest import (
    REAL_HOME,
    require_kernel,
    run_to_completion,
    run_with_stats,
    spy_preemptions,
)

# -- the drafter and the controller ------------------------------------------------------


def seq_of(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence.from_prompt(rid, tokens, SamplingParams())


def test_ngram_proposes_what_followed_the_latest_longest_match() -> None:
    d = NgramDrafter(min_n=1, max_n=3)
    # "5 6" occurred twice; the latest occurrence is followed by 9 8.
    s = seq_of([5, 6, 7, 1, 5, 6, 9, 8, 4, 5, 6])
    assert d.propose([s], [2])[0].tokens == [9, 8]
    # The index grows with the sequence: after 9, the match "6 9" continues with 8 4.
    s.append(9)
    assert d.propose([s], [3])[0].tokens == [8, 4, 5]
    assert d.propose([s], [0])[0].tokens == []


def test_ngram_repeats_a_period_that_runs_into_the_present() -> None:
    d = NgramDrafter(min_n=2, max_n=2)
    # The latest earlier "1 2" ends at position 4: the proposal runs 1 2 1 2 ...
    assert d.propose([seq_of([1, 2, 1, 2])], [5])[0].tokens == [1, 2, 1, 2, 1]


def test_ngram_without_a_match_proposes_nothing() -> None:
    d = NgramDrafter()
    assert d.propose([seq_of([1, 2, 3, 4, 5])], [4])[0].tokens == []
    with pytest.raises(ValueError):
        NgramDrafter(min_n=3, max_n=2)


def controller(alpha: float, ratio: float, max_tokens: int = 8) -> SpecController:
    c = SpecController(max_tokens)
    c.cost.prior_ratio = ratio
    c.overall.accepted, c.overall.rejected = 100 * alpha, 100 * (1 - alpha)
    return c


def test_the_controller_proposes_more_where_drafts_are_accepted() -> None:
    assert controller(0.95, 0.05).budgets(["a"], [8]) == [8]
    ks = [controller(a, 0.05).budgets(["a"], [8])[0] for a in (0.9, 0.6, 0.3, 0.02)]
    assert ks == sorted(ks, reverse=True) and ks[0] > ks[2] and ks[-1] == 0
    # A sequence near its length limit proposes no more than it may still generate.
    assert controller(0.95, 0.05).budgets(["a", "b"], [2, 0]) == [2, 0]


def test_the_controller_turns_off_in_a_large_batch() -> None:
    """When a row costs about its share of the step, only near-certain drafts pay."""
    c = controller(0.7, 0.3)
    assert c.budgets([str(i) for i in range(32)], [8] * 32) == [0] * 32
    assert controller(0.7, 0.3).budgets(["a"], [8])[0] >= 1


def test_a_switched_off_sequence_is_probed_now_and_then() -> None:
    c = controller(0.02, 0.05)
    seen = [c.budgets(["a"], [8])[0] for _ in range(PROBE_EVERY)]
    assert seen == [0] * (PROBE_EVERY - 1) + [1]
    c.observe_round("a", 1, 1)  # the probe was accepted: its estimate rises
    assert c._state("a").alpha > 0.02


def test_step_cost_fits_the_slope_of_time_against_rows() -> None:
    cost = StepCost(prior_ratio=0.5)
    for _ in range(400):
        for rows in (1, 4, 9):
            cost.observe(rows, 0.010 + 0.001 * rows)
    assert cost.row_ratio == pytest.approx(0.1, rel=0.05)


# -- rejection sampling ------------------------------------------------------------------


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's test of counts against expected counts (cells < 5 merged)."""
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    if exp[-1] < 5:  # the merged rest is too small a cell: fold it into the largest
        obs, exp = obs[:-1], exp[:-1]
        obs[exp.argmax()] += observed[~keep].sum()
        exp[exp.argmax()] += expected[~keep].sum()
    stat = ((obs - exp) ** 2 / exp).sum()
    # The chi-square survival function: the regularized upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2.0), stat / 2))


@pytest.mark.parametrize("draft", ["distribution", "point mass"])
def test_verified_tokens_follow_the_target_distribution(draft: str) -> None:
    torch.manual_seed(0)
    vocab, draws = 40, 20000
    params = SamplingParams(temperature=0.8, top_k=25, top_p=0.95, repetition_penalty=1.2)
    prompt = torch.tensor([3, 4, 5])
    p = probabilities(torch.randn(vocab) * 2, params, prompt, torch.tensor([7]))
    q = torch.randn(vocab).softmax(-1)
    g = make_generator(1, torch.device("cpu"))
    counts = torch.zeros(vocab)
    for _ in range(draws):
        if draft == "distribution":
            d = int(torch.multinomial(q, 1, generator=g))
            out = verify_token(p, d, q, g)
        else:
            d = 11  # a fixed proposal, as prompt lookup makes
            out = verify_token(p, d, None, g)
        counts[d if out is None else out] += 1
    assert counts[p == 0].sum() == 0  # filtered tokens never come out
    assert chi_square_p(counts, p * draws) > 1e-3


class RandomDrafter(Drafter):
    """Proposes tokens drawn from a fixed distribution q over the first `vocab` ids."""

    def __init__(self, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.q = torch.rand(vocab, generator=g).softmax(-1)
        self.g = g

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        out = []
        for k in ks:
            tokens = torch.multinomial(self.q, k, True, generator=self.g).tolist() if k else []
            out.append(Draft(tokens, self.q.expand(k, -1)))
        return out


@pytest.fixture(scope="module")
def tiny_small_vocab(tmp_path_factory, smollm_folder) -> LoadedModel:
    """A tiny random model over the first 48 token ids: chi-square cells stay full."""
    from tests.conftest import write_tiny_model

    folder = write_tiny_model(
        tmp_path_factory.mktemp("tiny48"), smollm_folder, vocab_size=48, initializer_range=0.05
    )
    return load_model(folder, torch.float32, torch.device("cpu"), Store(REAL_HOME), Console())


def test_speculative_sampling_matches_plain_sampling_in_the_engine(tiny_small_vocab) -> None:
    """The second and third tokens of many seeded requests, with and without drafts,
    come from the same distribution (a two-sample chi-square test on each position)."""
    config = EngineConfig(kv_cache_memory=0.02, max_num_seqs=64, prefix_cache=False)
    draws, prompt = 3000, [5, 9, 17, 3]
    outs = {}
    for spec in (False, True):
        engine = build_engine(tiny_small_vocab, config)
        if spec:
            spec_engine(engine, RandomDrafter(48, seed=3), k=2)
        params = [
            SamplingParams(
                temperature=0.9,
                top_k=30,
                presence_penalty=0.5,
                max_tokens=4,
                seed=i,
                ignore_eos=True,
            )
            for i in range(draws)
        ]
        got, stats = run_with_stats(engine, [prompt] * draws, params)
        rounds = sum(s.spec_rounds for s in stats)
        outs[spec] = torch.tensor(got)
        assert (rounds >= draws) == spec  # each request verified drafts at least once
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    for pos in (1, 2, 3):
        a = torch.bincount(outs[False][:, pos], minlength=48).double()
        b = torch.bincount(outs[True][:, pos], minlength=48).double()
        # Homogeneity: each sample against the pooled distribution.
        pooled = (a + b) / (2 * draws)
        assert chi_square_p(b, pooled * draws) > 1e-3, pos
        assert chi_square_p(a, pooled * draws) > 1e-3, pos


def spec_engine(engine: Engine, drafter: Drafter, k: int, adaptive: bool = False) -> Engine:
    """Switch an engine's speculation on with this drafter, k tokens a step."""
    engine.drafter = drafter
    engine.spec = SpecController(k, adaptive=adaptive)
    return engine


# -- exactness on the real model ---------------------------------------------------------


@pytest.fixture(scope="module")
def packed(smollm_gguf) -> LoadedModel:
    from llmopt.kernels import qgemv

    require_kernel(qgemv.load())
    return load_model(smollm_gguf, torch.float32, torch.device("cpu"), Store(REAL_HOME), Console())


TEXT = (
    "The lighthouse keeper climbed the stairs every evening at dusk, lit the lamp, "
    "and wrote the weather in a small leather book."
)
TASKS = [
    f"Repeat this sentence exactly: {TEXT}",
    f"Rewrite in the past tense, changing nothing else: {TEXT}",
    f"Summarise in one line: {TEXT}",
    "Write the numbers from one to twenty in words, separated by commas.",
    "Tell me about owls.",
    "def add(a, b):\n    return a + b\n\nRename the function add to plus and repeat the code.",
]


def chat_prompts(loaded: LoadedModel) -> list[list[int]]:
    return [loaded.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in TASKS]


class OracleDrafter(Drafter):
    """Proposes the reference continuation with every third token wrong (by default):
    rounds end in accepted runs and rejections at all offsets."""

    def __init__(
        self, prompts: list[list[int]], outputs: list[list[int]], wrong_every: int = 3
    ) -> None:
        self.ref = {tuple(p): o for p, o in zip(prompts, outputs, strict=True)}
        self.calls = 0
        self.wrong_every = wrong_every  # 0: never wrong

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        drafts = []
        for s, k in zip(seqs, ks, strict=True):
            ref = self.ref[tuple(s.token_ids[: s.num_prompt_tokens])]
            at = s.num_output_tokens
            tokens = list(ref[at : at + k])
            for j in range(len(tokens)):
                self.calls += 1
                if self.wrong_every and self.calls % self.wrong_every == 0:
                    tokens[j] = (tokens[j] + 1) % 49152
            drafts.append(Draft(tokens))
        return drafts


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
CONFIG = EngineConfig(max_context=2048, kv_cache_memory=0.05)


@pytest.fixture(scope="module")
def reference(packed) -> list[list[int]]:
    return run_to_completion(build_engine(packed, CONFIG), chat_prompts(packed), GREEDY)


def check_prefix_cache_holds_only_accepted_tokens(engine: Engine) -> None:
    """After every step, each sequence's registered block hashes are the chain over its
    own computed tokens: no rejected draft is ever entered into the prefix cache."""
    from llmopt.engine.block_manager import block_hash

    step = engine.step

    def checked():
        out = step()
        bs = engine.blocks.block_size
        for seq in engine.scheduler.running:
            assert len(seq.block_hashes) * bs <= seq.num_computed_tokens <= seq.num_tokens
            parent = None
            for i, h in enumerate(seq.block_hashes):
                parent = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
                assert h == parent
        return out

    engine.step = checked


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_output_is_unchanged_by_speculation(packed, reference, k) -> None:
    batch = chat_prompts(packed)
    engine = spec_engine(build_engine(packed, CONFIG), OracleDrafter(batch, reference), k)
    check_prefix_cache_holds_only_accepted_tokens(engine)
    assert run_to_completion(engine, batch, GREEDY) == reference
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("k", [2, 4, 8])
def test_prompt_lookup_is_exact_and_accepts_copied_text(packed, reference, k) -> None:
    batch = chat_prompts(packed)
    engine = spec_engine(build_engine(packed, CONFIG), NgramDrafter(), k)
    out, stats = run_with_stats(engine, batch, GREEDY)
    assert out == reference
    assert sum(s.spec_accepted_tokens for s in stats) > 20  # the copying tasks accept runs


def test_adaptive_speculation_is_exact_alone_and_under_preemption(packed, reference) -> None:
    """One prompt alone (batch 1, drafts at their longest) and all of them in a cache
    too small to hold them, so that sequences are preempted while verifying."""
    batch = chat_prompts(packed)
    engine = spec_engine(build_engine(packed, CONFIG), NgramDrafter(), 8, adaptive=True)
    assert run_to_completion(engine, batch[:1], GREEDY) == reference[:1]
    # A recomputed sequence's keys come from the prefill kernels, not bit for bit the
    # decode ones: 20 tokens, as in test_batch_invariance, stay clear of near ties.
    small = CONFIG.replace(kv_cache_memory=14 * 16 * 46080 / 1e9)  # 14 blocks of 16 tokens
    engine = spec_engine(build_engine(packed, small), OracleDrafter(batch, reference), 6)
    preempted = spy_preemptions(engine)
    short = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert run_to_completion(engine, batch, short) == [r[:20] for r in reference]
    assert preempted
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_stop_strings_and_length_end_inside_an_accepted_run(packed, reference) -> None:
    tok = packed.tokenizer
    batch = chat_prompts(packed)[:3]
    words = [tok.decode(ref[8:12]).strip().split()[0] for ref in reference[:3]]
    for stop, max_tokens in ((tuple(words), 40), ((), 7)):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=stop, ignore_eos=True)
        plain = build_engine(packed, CONFIG)
        oracle = OracleDrafter(batch, reference[:3], wrong_every=0)  # runs of 8 accepted
        engine = spec_engine(build_engine(packed, CONFIG), oracle, 8)
        want = [list(plain.generate(p, params)) for p in batch]
        got = [list(engine.generate(p, params)) for p in batch]
        for w, g in zip(want, got, strict=True):
            assert "".join(d.text for d in g) == "".join(d.text for d in w)
            assert g[-1].finish_reason == w[-1].finish_reason
            assert tokens(g) == tokens(w)
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_abort_in_the_middle_frees_everything(packed, reference) -> None:
    batch = chat_prompts(packed)
    engine = spec_engine(build_engine(packed, CONFIG), OracleDrafter(batch, reference), 4)
    ids = [engine.add_request(p, GREEDY) for p in batch]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(4):
        for rid in engine.step():
            out[rid] += tokens(engine.take(rid))
    engine.abort(ids[1])
    while engine.has_unfinished():
        for rid in engine.step():
            out[rid] += tokens(engine.take(rid))
    assert [out[r] for i, r in enumerate(ids) if i != 1] == reference[:1] + reference[2:]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_with_speculation_reproduces_alone_or_batched(packed) -> None:
    """A seeded request at temperature > 0 draws the same tokens alone and in a batch of
    others, however the controller's timings come out: it decides its drafts on its own
    acceptance and the prior row cost, not on the measured one or its neighbours'."""
    batch = chat_prompts(packed)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    others = SamplingParams(temperature=0.8, max_tokens=40, ignore_eos=True)
    config = CONFIG.replace(speculative="ngram")
    alone = run_to_completion(build_engine(packed, config), batch[:1], seeded)[0]
    engine = build_engine(packed, config)
    engine.spec.cost.prior_ratio = 0.9  # another machine: rows cost far more
    mixed, stats = run_with_stats(engine, batch, [seeded] + [others] * (len(batch) - 1))
    assert mixed[0] == alone
    assert stats[0].spec_rounds > 0  # it did speculate


def test_acceptance_stats_reach_the_request() -> None:
    from llmopt.engine.outputs import RequestStats

    s = RequestStats(spec_rounds=4, spec_draft_tokens=20, spec_accepted_tokens=10)
    assert s.acceptance_rate == 0.5 and s.mean_accepted_length == 3.5
    assert s.as_dict()["spec_acceptance_rate"] == 0.5
    assert "spec_acceptance_rate" not in RequestStats().as_dict()
    assert math.isclose(RequestStats().mean_accepted_length, 0.0)


def test_speculation_settings_are_checked() -> None:
    assert EngineConfig().speculation == "off"
    assert EngineConfig(speculative="ngram").speculation == "ngram"
    assert EngineConfig(draft="x.gguf").speculation == "draft"
    for bad in (
        dict(speculative="medusa"),
        dict(speculative="draft"),
        dict(speculative="ngram", draft="x.gguf"),
        dict(num_speculative_tokens=0),
    ):
        with pytest.raises(UsageError):
            EngineConfig(**bad)  # type: ignore[arg-type]


# -- a draft model ---------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_draft_model_leaves_greedy_output_unchanged(
    smollm_fp32, smollm_gguf, adaptive, monkeypatch
) -> None:
    """The practical pair: the fp32 model drafted by its own packed Q4_1 file. Its
    cache follows the target's (rollbacks after rejections), shares prompts through its
    own prefix cache and is empty once every request has finished."""
    from llmopt.engine.spec.draft_model import DraftModelDrafter

    monkeypatch.setenv("LLMOPT_HOME", str(REAL_HOME))  # the GGUF's converted copy is there

    batch = chat_prompts(smollm_fp32)
    plain = build_engine(smollm_fp32, CONFIG)
    # The first prompt again once the batch is done: a prefix-cache hit on both sides.
    want = [*run_to_completion(plain, batch, GREEDY), *run_to_completion(plain, batch[:1], GREEDY)]
    engine = build_engine(smollm_fp32, CONFIG.replace(draft=str(smollm_gguf)))
    drafter = engine.drafter
    assert isinstance(drafter, DraftModelDrafter) and engine.spec is not None
    engine.spec.adaptive = adaptive
    check_prefix_cache_holds_only_accepted_tokens(engine)
    got, stats = run_with_stats(engine, batch, GREEDY)
    again, more = run_with_stats(engine, batch[:1], GREEDY)
    assert got + again == want
    stats += more
    assert drafter.blocks.num_free_blocks == drafter.blocks.num_blocks
    if adaptive:
        return  # how much it drafted depends on this machine's timings
    accepted = sum(s.spec_accepted_tokens for s in stats)
    drafted = sum(s.spec_draft_tokens for s in stats)
    assert accepted > 0.6 * drafted > 0  # the int4 copy agrees with its fp32 model mostly
    assert drafter.blocks.hit_tokens > 0  # the repeated prompt's blocks in the draft's cache
    assert drafter.step_seconds > 0


def test_a_draft_model_with_another_vocabulary_is_refused(smollm_fp32, tmp_path) -> None:
    import json

    from tests.conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "other-vocab", smollm_fp32.folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]  # two tokens trade ids: the same texts, other ids
    a, b = (next(t for t in vocab if vocab[t] == i) for i in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UsageError, match="another vocabulary"):
        build_engine(smollm_fp32, CONFIG.replace(draft=str(folder)))
