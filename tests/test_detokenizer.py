"""IncrementalDetokenizer: streaming output equals Tokenizer.decode and never splits a character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.text.stream import IncrementalDetokenizer
from model.text.tokenizer import Tokenizer
from model.weights.sources import bundled_model_path
from tests.gguf_text import gguf_tokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return gguf_tokenizer(bundled_model_path())


def stream(tok: Tokenizer, ids: list[int], *, skip: bool) -> tuple[list[str], str]:
    """Feed `ids` one by one; return (each add() result, flush())."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.add(i) for i in ids], detok.flush()


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode_on_fixture(tok: Tokenizer, skip: bool) -> None:
    cases = json.loads(GOLDEN.read_text())["tokenizer"]
    key = "decoded_skip_special" if skip else "decoded"
    for case in cases:
        pieces, tail = stream(tok, case["ids"], skip=skip)
        assert (
            "".join(pieces) + tail == case[key] == tok.decode(case["ids"], skip_special_tokens=skip)
        )
        assert tail == ""  # every fixture string is valid UTF-8


def test_special_tokens_skipped_or_shown(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert "".join(stream(tok, ids, skip=True)[0]) == "assistant\nHi"
    assert "".join(stream(tok, ids, skip=False)[0]) == "<|im_start|>assistant\nHi<|im_end|>"


def test_multi_token_emoji_emitted_once_complete(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) == 3  # the emoji's 4 bytes span three byte-level tokens
    pieces, tail = stream(tok, ids, skip=True)
    assert pieces == ["", "", "😀"] and tail == ""


def test_pieces_are_whole_characters_and_extend_prefix(tok: Tokenizer) -> None:
    text = "Family: 👩‍👩‍👧‍👦, flag 🇫🇷, 中文字符, ❤️ done"
    ids = tok.encode(text)
    pieces, tail = stream(tok, ids, skip=True)
    assert len(ids) > len(text.split())  # many characters span several tokens
    assert pieces.count("") >= 5
    emitted = ""
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # raises on lone surrogates
        emitted += piece
        assert text.startswith(emitted)
    assert emitted + tail == text and tail == ""


def test_flush_replaces_incomplete_character(tok: Tokenizer) -> None:
    first = tok.encode("😀")[0]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(tok.encode("ok")[0]) == "ok"
    assert detok.add(first) == ""
    assert detok.flush() == "\ufffd"
    assert tok.decode([*tok.encode("ok"), first]) == "ok\ufffd"
