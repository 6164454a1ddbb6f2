"""Tokenizer tests: byte-level BPE against HF golden output, SentencePiece against itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.text.backends import gpt2_byte_decoder, pre_tokenizer_for
from model.text.stream import IncrementalDetokenizer
from model.text.tokenizer import Tokenizer
from model.weights.sources import bundled_model_path
from tests.gguf_text import gguf_tokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return gguf_tokenizer(bundled_model_path())


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


# -- byte-level BPE (SmolLM2) against transformers -------------------------------


def test_golden_encode_decode(smollm2: Tokenizer, golden: dict) -> None:
    cases = golden["tokenizer"]
    assert len(cases) >= 18
    for case in cases:
        ids = smollm2.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert smollm2.decode(ids) == case["decoded"], case["text"]
        assert smollm2.decode(ids, skip_special_tokens=True) == case["decoded_skip_special"]


def test_golden_prompt_ids(smollm2: Tokenizer, golden: dict) -> None:
    for prompt in golden["prompts"]:
        assert smollm2.encode(prompt["text"]) == prompt["ids"]


def test_smollm2_special_tokens(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.stop_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert smollm2.special_ids == frozenset(range(17))
    assert smollm2.id_to_token(1) == "<|im_start|>"
    assert smollm2.id_to_token(216) == "Ġ"


def test_smollm2_add_bos(smollm2: Tokenizer) -> None:
    # The GGUF says add_bos_token False; asking explicitly still works.
    assert smollm2.encode("Hello") == [19556]
    assert smollm2.encode("Hello", add_bos=True) == [1, 19556]


def test_smollm2_digits_split_individually(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("2024")
    assert [smollm2.id_to_token(i) for i in ids] == ["2", "0", "2", "4"]


PRE_TOKENIZER_CASES = {
    # llama.cpp pre type: expected pre-tokens of "I'm  12345 ok\n\n". For smollm the
    # digit split comes first, so both spaces end a fragment and stay together.
    "smollm": ["I", "'m", "ĠĠ", "1", "2", "3", "4", "5", "Ġok", "ĊĊ"],
    "llama-bpe": ["I", "'m", "Ġ", "Ġ", "123", "45", "Ġok", "ĊĊ"],
    "qwen2": ["I", "'m", "Ġ", "Ġ", "1", "2", "3", "4", "5", "Ġok", "ĊĊ"],
    "gpt2": ["I", "'m", "Ġ", "Ġ12345", "Ġok", "ĊĊ"],
}


@pytest.mark.parametrize("pre", PRE_TOKENIZER_CASES)
def test_pre_tokenizers(pre: str) -> None:
    pieces = pre_tokenizer_for(pre).pre_tokenize_str("I'm  12345 ok\n\n")
    assert [p for p, _ in pieces] == PRE_TOKENIZER_CASES[pre]


def test_smollm2_token_bytes(smollm2: Tokenizer) -> None:
    assert smollm2.token_bytes(216) == b" "  # 'Ġ'
    assert smollm2.token_bytes(198) == b"\n"  # 'Ċ'
    assert smollm2.token_bytes(2) == b"<|im_end|>"
    emoji_ids = smollm2.encode("😀")
    assert b"".join(smollm2.token_bytes(i) for i in emoji_ids) == "😀".encode()
    assert smollm2.decode(emoji_ids[:1]) == "\ufffd"  # a lone partial character


def test_gpt2_byte_decoder_is_a_bijection() -> None:
    table = gpt2_byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 32 and table["Ċ"] == 10 and table["A"] == 65


# -- SentencePiece: a tiny model trained here, round-tripped through GGUF ---------

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! How are you today?",
    "Tokenizers split text into pieces and pieces into ids.",
    "A small model for tests only; numbers 12345 and 67890.",
    "She sells sea shells by the sea shore, then goes home.",
]

SPM_STRINGS = [
    "Hello world",
    "the lazy dog jumps",
    " leading space",
    "  two  spaces  and trailing ",
    "line one\nline two\n\ttabbed",
    "x [INST] y [/INST] z",
    "[INST]glued[/INST]",
    "😀 emoji 👩‍👧 not in training",
    "Ünïcödé çåñ, 中文, русский",
    "12345 + 0.5 = ?",
    "",
]


def write_spm_gguf(path: Path, proto: sp_pb2.ModelProto, *, add_space_prefix: bool) -> None:
    """Write a GGUF whose tokenizer metadata holds the pieces of `proto`."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_prefix"])
def spm_pair(request, tmp_path_factory) -> tuple[spm.SentencePieceProcessor, Tokenizer]:
    """(reference SentencePieceProcessor, our Tokenizer loaded from its GGUF)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        # Llama-style normalization: none, keep whitespace as written.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=request.param,
        user_defined_symbols=["[INST]", "[/INST]"],
        control_symbols=["<ctl>"],
        minloglevel=2,
    )
    proto = sp_pb2.ModelProto.FromString(model.getvalue())
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    write_spm_gguf(path, proto, add_space_prefix=request.param)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), gguf_tokenizer(path)


def test_spm_matches_sentencepiece(spm_pair) -> None:
    sp, tok = spm_pair
    assert tok.vocab_size == sp.vocab_size() == 400
    for text in SPM_STRINGS:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
        assert [tok.id_to_token(i) for i in ids] == sp.encode(text, out_type=str)


def test_spm_byte_fallback_used(spm_pair) -> None:
    sp, tok = spm_pair
    ids = tok.encode("😀", add_bos=False)
    byte_pieces = [tok.id_to_token(i) for i in ids if tok.id_to_token(i).startswith("<0x")]
    assert byte_pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.token_bytes(sp.piece_to_id("<0xF0>")) == b"\xf0"


def test_spm_special_tokens_in_text(spm_pair) -> None:
    sp, tok = spm_pair
    assert (tok.bos_id, tok.eos_id, tok.bos_token, tok.eos_token) == (1, 2, "<s>", "</s>")
    assert tok.stop_ids == frozenset({2})
    ctl = sp.piece_to_id("<ctl>")
    assert tok.special_ids == frozenset({0, 1, 2, ctl})
    # Control tokens written in the text become their ids; the text around is
    # encoded as its own segment (dummy prefix included), as llama.cpp does.
    ids = tok.encode("<s>hi<ctl></s>", add_bos=False)
    assert ids == [1, *sp.encode("hi"), ctl, 2]
    assert tok.encode("hi") == [1, *sp.encode("hi")]  # add_bos_token True in the GGUF
    # User-defined pieces are matched by SentencePiece itself.
    assert sp.piece_to_id("[INST]") in tok.encode("[INST] hi", add_bos=False)


def test_spm_decode_special(spm_pair) -> None:
    sp, tok = spm_pair
    ids = [1, *sp.encode("Hello world"), 2]
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "Hello world"
    space = " " if sp_has_dummy_prefix(sp) else ""
    assert tok.decode(ids) == f"<s>{space}Hello world</s>"


def sp_has_dummy_prefix(sp: spm.SentencePieceProcessor) -> bool:
    return sp_pb2.ModelProto.FromString(
        sp.serialized_model_proto()
    ).normalizer_spec.add_dummy_prefix


def test_spm_incremental_detokenizer(spm_pair) -> None:
    sp, tok = spm_pair
    for text in SPM_STRINGS:
        ids = [1, *tok.encode(text, add_bos=False), 2]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.flush() == sp.decode(ids) == text
