"""Tensor and pipeline parallelism (llmopt/distributed/): how weights, layers and steps
are split, greedy output against one rank on the real SmolLM2 and a tiny random Llama
(batched, with prefix-cache hits and preemption), each rank's share of the weights and
KV cache, torchrun's launch over TCP, and a lost rank ending in an error.

Pipeline stages hand each other the very tensors one rank's next block would take, and
the exact tensor-parallel split (the default) computes every output whole on one rank:
both give one rank's output bit for bit. Megatron's split adds partial sums in another
order (two all-reduces a layer): its logits differ in the last bits, which a greedy
choice between near-equal tokens can turn (see check_close)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmopt.config import ModelConfig
from llmopt.distributed import group
from llmopt.distributed.collectives import ShmCollectives
from llmopt.distributed.pipeline import bubble
from llmopt.distributed.shard import Shard, check_split, cut, local_config
from llmopt.distributed.stage import Stage
from llmopt.distributed.steps import WorkerLost
from llmopt.engine.footprint import weight_bytes
from llmopt.engine.llm import LLM
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import Step
from llmopt.errors import UsageError
from llmopt.weights.qweight import quantize_rtn
from tests.conftest import spy_preemptions, write_tiny_model
from tests.test_cli import llmopt

SYSTEM = "You are a concise assistant. Answer in one short sentence, without preamble. "
QUESTIONS = [
    "Name the capital of France.",
    "What is the boiling point of water at sea level?",
    "Which planet is the largest in the solar system?",
    "What do bees make?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
]


def config(heads: int, kv: int, intermediate: int, layers: int = 4) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=10, hidden_size=16 * heads,
        intermediate_size=intermediate, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip


# -- the split ---------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "kv", "size"), [(9, 3, 3), (8, 2, 4), (6, 1, 3), (6, 6, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads, kv, size) -> None:
    for rank in range(size):
        shard = Shard(rank, size)
        mine = shard.kv_heads(kv)
        for h in shard.part(heads):
            assert h // (heads // kv) in mine
        assert len(mine) == max(1, kv // size)  # split, or one replicated


def test_a_split_the_model_cannot_take_names_those_it_can() -> None:
    with pytest.raises(UsageError, match="over 2 ranks; --tensor-parallel-size can be 1, 3"):
        check_split(config(9, 3, 1536), 2)
    with pytest.raises(UsageError, match="can be 1, 2, 6"):
        check_split(config(6, 2, 96), 3)  # 3 ranks cannot share 2 KV heads
    check_split(config(6, 1, 192), 3)  # one KV head, replicated


def test_weights_cut_by_heads_width_and_vocabulary() -> None:
    cfg = config(6, 3, 96)
    shard = Shard(1, 3)
    local = local_config(cfg, shard)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 32)
    w = torch.arange(96 * 96, dtype=torch.float32).view(96, 96)
    assert torch.equal(cut("model.layers.0.self_attn.q_proj.weight", w, cfg, shard), w[32:64])
    kv = torch.arange(48 * 96, dtype=torch.float32).view(48, 96)
    assert torch.equal(cut("model.layers.0.self_attn.v_proj.weight", kv, cfg, shard), kv[16:32])
    assert torch.equal(cut("model.layers.0.self_attn.o_proj.weight", w, cfg, shard), w[:, 32:64])
    down = torch.randn(96, 96)
    assert torch.equal(cut("model.layers.0.mlp.down_proj.weight", down, cfg, shard), down[:, 32:64])
    exact = Shard(1, 3, exact=True)  # by output rows, every input
    assert torch.equal(cut("model.layers.0.mlp.down_proj.weight", down, cfg, exact), down[32:64])
    assert torch.equal(cut("model.layers.0.self_attn.o_proj.weight", w, cfg, exact), w[32:64])
    table = torch.randn(10, 96)  # 10 tokens over 3 ranks: 4 rows each, the last 2 padded
    last = cut("lm_head.weight", table, cfg, Shard(2, 3))
    assert torch.equal(last[:2], table[8:]) and not last[2:].any()
    norm = torch.randn(96)
    assert cut("model.layers.0.input_layernorm.weight", norm, cfg, shard) is norm


def test_quantized_columns_are_cut_on_group_boundaries() -> None:
    w = torch.randn(8, 128)
    qw = quantize_rtn(w, 4, 32)
    part = qw.columns(32, 96)
    assert part.shape == (8, 64)
    assert torch.equal(part.dequantize(), qw.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match="do not fall on its groups of 32"):
        qw.columns(16, 80)
    per_channel = quantize_rtn(w, 8, 128)
    assert torch.equal(per_channel.columns(0, 64).dequantize(), per_channel.dequantize()[:, :64])
    qw.perm = torch.randperm(128)
    with pytest.raises(ValueError, match="act-order"):
        qw.columns(0, 64)


def test_stages_take_consecutive_layers_renumbered() -> None:
    assert [Stage(i, 3).layers(30) for i in range(3)] == [
        range(0, 10),
        range(10, 20),
        range(20, 30),
    ]
    assert [Stage(i, 2).layers(5) for i in range(2)] == [range(0, 2), range(2, 5)]
    cfg = config(2, 1, 32, layers=4)
    full = {
        "model.embed_tokens.weight": torch.zeros(1),
        "model.layers.1.mlp.down_proj.weight": torch.ones(1),
        "model.layers.2.mlp.down_proj.weight": torch.full((1,), 2.0),
        "model.layers.3.input_layernorm.weight": torch.full((1,), 3.0),
    }
    weights = Stage(1, 2).weights(full, cfg)
    assert sorted(weights) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ]
    assert weights["model.layers.0.mlp.down_proj.weight"].item() == 2.0
    assert Stage(1, 2).config(cfg).num_layers == 2
    with pytest.raises(UsageError, match="1 to the model's 4 layers"):
        Stage(0, 5).check(cfg)


def test_micro_batches_are_consecutive_and_even_in_tokens() -> None:
    step = Step()
    for i, n in enumerate([100, 1, 1, 1, 60, 40]):
        step.add(i, n)  # any object stands for a sequence here
    parts = step.split(3)
    assert [p.seqs for p in parts] == [[0], [1, 2, 3, 4], [5]]
    assert step.split(1) == [step] and len(step.split(10)) <= 6
    assert bubble(2, 2) == pytest.approx(1 / 3) and bubble(1, 4) == 0


def _shm_rank(rank: int, world: int, port: int, out: Path) -> None:
    ranks = group.join(group.Rendezvous(rank, world, "127.0.0.1", port))
    reduce = ShmCollectives.open(ranks, slot=4096)  # small: 3,000 values take 3 or 2 calls
    assert reduce is not None
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3000, generator=torch.Generator().manual_seed(rank)).to(dtype)
        each = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(each, x)
        reduce(x)
        expected = each[0].float()
        for t in each[1:]:
            expected = expected + t.float()  # rank order, in fp32, rounded once
        results.append((x, expected.to(dtype)))
    mine = torch.arange(3000.0).view(300, 10) + 10_000 * rank
    gathered = reduce.gather(mine)  # (ranks, 300, 10); 12 KB a rank: 3 calls
    assert [torch.equal(gathered[r], mine - 10_000 * (rank - r)) for r in range(world)] == [
        True
    ] * world
    torch.save(results, out / f"{rank}.pt")
    group.leave()


def test_shared_memory_collectives_sum_in_rank_order_and_gather(tmp_path) -> None:
    mp.spawn(_shm_rank, args=(3, group.free_port(), tmp_path), nprocs=3)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(3)]
    for i in range(2):  # fp32, bf16
        for got, expected in (res[i] for res in results):
            assert torch.equal(got, expected)
            assert torch.equal(got, results[0][i][0])  # every rank the same bits


def _shm_orphan(rank: int, port: int, out: Path) -> None:
    ranks = group.join(group.Rendezvous(rank, 2, "127.0.0.1", port))
    reduce = ShmCollectives.open(ranks)
    if rank == 1:
        os._exit(0)  # gone without a word: no socket closes on rank 0's wait
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="process is gone"):
        reduce(torch.ones(8))
    (out / "waited").write_text(str(time.monotonic() - start))


def test_shared_memory_all_reduce_sees_a_peer_go(tmp_path) -> None:
    mp.spawn(_shm_orphan, args=(group.free_port(), tmp_path), nprocs=2)
    assert float((tmp_path / "waited").read_text()) < 5


# -- against one rank ------------------------------------------------------------------


def generate(llm: LLM, prompts: list[str], max_tokens: int, logprobs: int | None = None):
    """Each prompt's greedy tokens (all at once, one batch), their logprobs, and stats."""
    engine = llm.engine
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )
    ids = [engine.add_request(llm.encode(p, chat=True), params) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    lps: dict[str, list] = {rid: [] for rid in ids}
    stats = {}
    while engine.has_unfinished():
        for rid in engine.step():
            for d in engine.take(rid):
                tokens[rid] += d.token_ids
                lps[rid] += d.logprobs or []
                if d.stats is not None:
                    stats[rid] = d.stats
    return [tokens[r] for r in ids], [lps[r] for r in ids], [stats[r] for r in ids]


def check_close(ref: list, got: list, k: int) -> None:
    """The same greedy tokens up to the first difference, and there each side's token
    among the other's k likeliest (vLLM's check for kernels that round differently)."""
    for a, b in zip(ref, got, strict=True):
        for x, y in zip(a, b, strict=True):
            if x.token_id != y.token_id:
                assert x.token_id in [t for t, _ in y.top[:k]], (x, y)
                assert y.token_id in [t for t, _ in x.top[:k]], (x, y)
                break
            assert abs(x.logprob - y.logprob) < 0.5


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [SYSTEM + q for q in QUESTIONS]  # a shared prefix: prefix-cache hits


def test_pipeline_gives_one_ranks_tokens_on_the_packed_model(smollm_gguf, prompts) -> None:
    # About 170 tokens of cache for ~6 x 90, so that the scheduler preempts and
    # recomputes; each stage holds half the layers, so half the memory holds as many
    # blocks, and the schedule (and its preemptions) is the one rank's.
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.008) as one:
        ref, _, _ = generate(one, prompts, 40)
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.004, pipeline_parallel_size=2) as pp:
        assert pp.engine.kv_capacity_tokens == one.engine.kv_capacity_tokens
        preempted = spy_preemptions(pp.engine)
        got, _, stats = generate(pp, prompts, 40)
    assert got == ref
    assert preempted, "the cache was meant to be too small for the batch"
    assert sum(s.cached_prompt_tokens for s in stats) > 0


def test_tensor_parallel_gives_one_ranks_tokens_on_the_dense_model(smollm_gguf, prompts) -> None:
    # Preemption as in the pipeline's test: a rank holds a third of the KV heads, so a
    # third of the memory holds the one rank's blocks.
    dense = dict(dequantize=True, dtype="float32", max_num_seqs=6)
    with LLM(smollm_gguf, kv_cache_memory=0.008, **dense) as one:
        ref, _, _ = generate(one, prompts, 40)
    with LLM(smollm_gguf, kv_cache_memory=0.008 / 3, tensor_parallel_size=3, **dense) as tp:
        assert tp.engine.kv_capacity_tokens == one.engine.kv_capacity_tokens
        preempted = spy_preemptions(tp.engine)
        got, _, stats = generate(tp, prompts, 40)
    assert got == ref
    assert preempted
    assert sum(s.cached_prompt_tokens for s in stats) > 0


def test_tensor_parallel_gives_one_ranks_tokens_on_the_packed_model(smollm_gguf, prompts) -> None:
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.008) as one:
        ref, _, _ = generate(one, prompts, 40)
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.008 / 3, tensor_parallel_size=3) as tp:
        preempted = spy_preemptions(tp.engine)
        got, _, _ = generate(tp, prompts, 40)
    assert got == ref
    assert preempted


def test_megatron_split_on_the_packed_model_rounds_alike(smollm_gguf, prompts) -> None:
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.1) as one:
        _, ref, _ = generate(one, prompts, 16, logprobs=5)
    settings = dict(tensor_parallel_size=3, exact_tensor_parallel=False)
    with LLM(smollm_gguf, max_num_seqs=6, kv_cache_memory=0.1, **settings) as tp:
        _, got, _ = generate(tp, prompts, 16, logprobs=5)
    check_close(ref, got, k=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_folder) -> Path:
    """6 query heads and one KV head: every split replicates it."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    return write_tiny_model(
        folder, smollm_folder, hidden_size=96, intermediate_size=192,
        num_attention_heads=6, num_key_value_heads=1,
    )  # fmt: skip


MEGATRON = {"tensor_parallel_size": 2, "exact_tensor_parallel": False}


@pytest.mark.parametrize(
    "settings",
    [
        {"tensor_parallel_size": 2},
        {"tensor_parallel_size": 3},
        MEGATRON,
        {"pipeline_parallel_size": 2},
    ],
)
def test_tiny_model_split(tiny, settings) -> None:
    prompts = ["Hello there", "The capital of France", "1 2 3 4"]
    with LLM(tiny, max_num_seqs=4, kv_cache_memory=0.01) as one:
        ref_tokens, ref, _ = generate(one, prompts, 12, logprobs=5)
    with LLM(tiny, max_num_seqs=4, kv_cache_memory=0.01, **settings) as split:
        tokens, got, _ = generate(split, prompts, 12, logprobs=5)
    if settings is MEGATRON:  # sums in another order: equal up to rounding
        check_close(ref, got, k=5)
    else:
        assert tokens == ref_tokens
        assert [[x.logprob for x in a] for a in got] == [[x.logprob for x in a] for a in ref]


def kv_per_token(llm: LLM) -> tuple[int, int, int]:
    """The cache's layers, KV heads and bytes per token slot."""
    c = llm.engine.runner.cache
    layers, slots, kv, _ = c.k.shape
    return layers, kv, (c.k.nbytes + c.v.nbytes) // slots


def test_each_rank_holds_its_share_of_weights_and_kv(smollm_gguf) -> None:
    with LLM(smollm_gguf, kv_cache_memory=0.05) as one:
        weights, (_, _, per_token) = weight_bytes(one.engine.runner.model), kv_per_token(one)
    with LLM(smollm_gguf, kv_cache_memory=0.05, tensor_parallel_size=3) as tp:
        shard, (layers, heads, shard_per_token) = (
            weight_bytes(tp.engine.runner.model),
            kv_per_token(tp),
        )
    assert 0.30 < shard / weights < 0.37  # a third, and the norms on every rank
    assert (layers, heads, shard_per_token * 3) == (30, 1, per_token)
    with LLM(smollm_gguf, kv_cache_memory=0.05, pipeline_parallel_size=2) as pp:
        stage, (layers, heads, stage_per_token) = (
            weight_bytes(pp.engine.runner.model),
            kv_per_token(pp),
        )
    assert (layers, heads, stage_per_token * 2) == (15, 3, per_token)
    assert stage < weights


# -- launch and failure ------------------------------------------------------------------


def test_torchrun_across_two_nodes_over_tcp(tiny) -> None:
    """Two torchrun invocations, one per "node", with one rank each: the driver's
    answer is one rank's."""
    question = ["Hello there", "--max-tokens", "8", "--temperature", "0"]
    r = llmopt("run", str(tiny), *question)
    assert r.exit_code == 0, r.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(group.free_port())]
    command = ["-m", "llmopt", "run", str(tiny), *question, "--pipeline-parallel-size", "2"]
    nodes = [
        subprocess.Popen(
            [*torchrun, "--node-rank", str(i), "--nproc-per-node", "1", *rendezvous, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0] == r.stdout
    assert outs[1][0] == ""  # the worker rank prints nothing of its own


def test_a_killed_rank_is_an_error_not_a_hang(tiny) -> None:
    with LLM(tiny, tensor_parallel_size=2, kv_cache_memory=0.01) as llm:
        llm.generate("hi", SamplingParams(temperature=0, max_tokens=2))
        worker = llm.engine.runner.peers.processes[0]
        worker.kill()
        worker.wait()
        with pytest.raises(WorkerLost, match=r"rank 1 \(exit code -9\) was lost"):
            llm.generate("hi", SamplingParams(temperature=0, max_tokens=2))


def test_a_stalled_rank_times_out(tiny, monkeypatch) -> None:
    monkeypatch.setattr(group, "COLLECTIVE_TIMEOUT_S", 3.0)
    with LLM(tiny, pipeline_parallel_size=2, kv_cache_memory=0.01) as llm:
        worker = llm.engine.runner.peers.processes[0]
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(WorkerLost, match="no answer within 3 s"):
                llm.generate("hi", SamplingParams(temperature=0, max_tokens=2))
            assert time.monotonic() - start < 15
        finally:
            worker.kill()


def test_the_server_stops_when_its_model_loses_a_rank(tiny) -> None:
    port = group.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmopt", "serve", str(tiny), "--port", str(port),
         "--tensor-parallel-size", "2", "--kv-cache-memory", "0.01", "--no-response-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    try:
        for _ in range(240):
            try:
                assert httpx.post(url, json=body, timeout=30).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.5)
        engines = children(server.pid)
        workers = [w for e in engines for w in children(e)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code >= 500 and "was lost" in r.json()["error"]["message"]
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 1
    assert "its model's engine ended" in err and "was lost" in err


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_settings_that_cannot_split_are_refused(smollm_gguf) -> None:
    r = llmopt("run", str(smollm_gguf), "hi", "--tensor-parallel-size", "2")
    assert r.exit_code != 0 and "can be 1, 3" in r.stderr
    r = llmopt("run", str(smollm_gguf), "hi", "--tensor-parallel-size", "3",
               "--pipeline-parallel-size", "2")  # fmt: skip
    assert r.exit_code != 0 and "do not combine" in r.stderr
    r = llmopt("bench", str(smollm_gguf), "--perplexity", "--tensor-parallel-size", "3")
    assert r.exit_code != 0 and "one process" in r.stderr
