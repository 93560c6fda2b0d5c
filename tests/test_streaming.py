"""Streaming text: incremental detokenization and stop strings."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from llmopt.engine.detokenizer import Detokenizer
from llmopt.engine.stop import StopMatcher
from llmopt.tokenizer import Tokenizer


def stream(matcher: StopMatcher, pieces: list[str]) -> str:
    out = []
    for p in pieces:
        out.append(matcher.feed(p))
        if matcher.stopped:
            return "".join(out)
    return "".join(out) + matcher.flush()


def test_stop_string_split_across_deltas() -> None:
    m = StopMatcher(("###",))
    shown = [m.feed(p) for p in ["Hello #", "#", "# world"]]
    assert shown == ["Hello ", "", ""]
    assert m.stopped


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("a ST") == "a "
    assert m.feed("ART") == "START"
    assert not m.stopped


def test_earliest_of_several_stops_wins() -> None:
    assert stream(StopMatcher(("bb", "a")), ["xxbba"]) == "xx"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab#xy", max_size=40),
    stop=st.text(alphabet="ab#", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_streamed_output_equals_text_before_first_stop(text, stop, cuts) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    i = text.find(stop)
    expected = text if i < 0 else text[:i]
    assert stream(StopMatcher((stop,)), pieces) == expected


def test_detokenizer_streams_exact_text_with_multibyte_characters(smollm_folder) -> None:
    tok = Tokenizer(smollm_folder)
    text = "Émojis 🤖🎉 and 漢字, spaced  out.\nNew line 123."
    ids = tok.encode(text, add_bos=False)
    d = Detokenizer(tok)
    shown = ""
    for n, token in enumerate(ids, 1):
        delta = d.add(token)
        assert "\ufffd" not in delta  # never half a character
        shown += delta
        # ... and nothing held back longer than that: all of the text decoded so far but
        # a tail that ends in an incomplete character.
        so_far = tok.decode(ids[:n])
        held = so_far[len(shown) :]
        assert so_far.startswith(shown) and (held == "" or held.endswith("\ufffd")), n
    assert shown == text and d.flush() == ""
