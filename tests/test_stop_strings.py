"""StopStringMatcher: stop strings found across any chunking, with nothing lost or reordered."""

from __future__ import annotations

import random

import pytest

from model.text.stream import StopStringMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    """Feed chunks until stopped; return (emitted text, stopped, per-call outputs)."""
    matcher = StopStringMatcher(stops)
    emitted, outputs, stopped = "", [], False
    for chunk in chunks:
        out, stopped = matcher.add(chunk)
        outputs.append(out)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    return emitted, stopped, outputs


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Brute force: cut at the stop that completes first (earliest start on ties)."""
    for end in range(len(text) + 1):
        hits = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[: min(hits)], True
    return text, False


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(0, 5)  # empty chunks included
        chunks.append(text[i : i + n])
        i += n
    return chunks


CASES = [
    # (text, stops, expected emitted text, stopped)
    ("Hello world. STOP here", ["STOP"], "Hello world. ", True),
    ("STOP at start", ["STOP"], "", True),
    ("no stop in this text", ["STOP"], "no stop in this text", False),
    ("almost STO but not", ["STOP"], "almost STO but not", False),
    ("ends with a partial STO", ["STOP"], "ends with a partial STO", False),
    ("aaab", ["aab"], "a", True),  # overlapping self-prefix
    ("abcd", ["abcd", "bc"], "a", True),  # shorter stop completes first
    ("xabc", ["bc", "abc"], "x", True),  # same end: earliest start wins
    ("one\n\nUser: two", ["\n\nUser:", "\nAssistant:"], "one", True),
    ("<|im_end|>tail", ["<|im_end|>", "<|im"], "", True),
    ("aXbYc", ["Y", "X"], "a", True),  # stop order in the list is irrelevant
    ("😀 emoji ✂ cut", ["✂"], "😀 emoji ", True),
    ("text", [""], "text", False),  # empty stop strings are ignored
]


@pytest.mark.parametrize(("text", "stops", "expected", "stopped"), CASES)
def test_whole_text(text: str, stops: list[str], expected: str, stopped: bool) -> None:
    assert reference(text, stops) == (expected, stopped)
    assert run(stops, [text])[:2] == (expected, stopped)


@pytest.mark.parametrize(("text", "stops", "expected", "stopped"), CASES)
def test_char_by_char(text: str, stops: list[str], expected: str, stopped: bool) -> None:
    assert run(stops, list(text))[:2] == (expected, stopped)


@pytest.mark.parametrize(("text", "stops", "expected", "stopped"), CASES)
def test_random_chunks(text: str, stops: list[str], expected: str, stopped: bool) -> None:
    rng = random.Random(1234)
    for _ in range(50):
        assert run(stops, random_chunks(text, rng))[:2] == (expected, stopped)


def test_random_texts_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(500):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 12)))
        assert run(stops, random_chunks(text, rng))[:2] == reference(text, stops), (text, stops)


def test_holds_back_only_possible_prefix() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.add("value </e") == ("value ", False)
    assert matcher.add("x") == ("</ex", False)  # not a stop after all: released in order
    assert matcher.add("tail </en") == ("tail ", False)
    assert matcher.add("d>ignored") == ("", True)
    assert matcher.add("more") == ("", True)
    assert matcher.flush() == ""


def test_flush_releases_pending_prefix() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.add("abc ST") == ("abc ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_no_stops_pass_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.add("anything STOP <|im_end|>") == ("anything STOP <|im_end|>", False)
    assert matcher.add("") == ("", False)
    assert matcher.flush() == ""
