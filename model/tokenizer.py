"""Tokenizer rebuilt from the metadata of a GGUF file.

GGUF stores the vocabulary itself (tokens, token types, BPE merges or
SentencePiece scores), so no tokenizer.json / tokenizer.model is needed. Two
backends, chosen by `tokenizer.ggml.model`:

* ``gpt2``: byte-level BPE run by Hugging Face `tokenizers`, with the
  pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
* ``llama``: SentencePiece, from a ModelProto assembled from the GGUF pieces.

Decoding is done here, from per-token bytes, for both backends: that keeps
`Tokenizer.decode` and the streaming `IncrementalDetokenizer` byte-for-byte
consistent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Protocol

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types; the numbering is SentencePiece's ModelProto.SentencePiece.Type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in common chat formats.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Pre-tokenizer split patterns, as in llama.cpp's llama-vocab.cpp and the
# models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre types that split digits one by one, then apply the GPT-2 regex.
_STARCODER_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"})
_QWEN2_PRE = frozenset({"qwen2", "deepseek-r1-qwen"})
_SPLIT_PATTERNS = {
    **dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT),
    **dict.fromkeys(_QWEN2_PRE, _QWEN2_SPLIT),
}


@cache
def gpt2_byte_decoder() -> dict[str, int]:
    """Return GPT-2's byte-level alphabet inverted: printable char -> byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    to_char = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, ...) map to code points from 256 up.
    extra = (b for b in range(256) if b not in to_char)
    to_char.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return {c: b for b, c in to_char.items()}


def _field(reader: gguf.GGUFReader, key: str, default=None):
    """Return the decoded value of GGUF metadata `key`, or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...


class _ByteLevelBPE:
    """Byte-level BPE (GPT-2 style) through HF `tokenizers`."""

    def __init__(
        self, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str
    ) -> None:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)  # duplicates (rare padding entries): first id wins
        # Byte-level tokens never contain a real space, so the first space separates the pair.
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        # Llama-3 looks a whole pre-token up in the vocab before merging (llama.cpp does too).
        bpe = models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_PRE)
        self.hf = HFTokenizer(bpe)
        self.hf.pre_tokenizer = pre_tokenizer_for(pre)
        self.hf.decoder = decoders.ByteLevel()
        # Control and user-defined tokens are matched verbatim in the input text.
        self.hf.add_special_tokens(_added_tokens(tokens, types, CONTROL, special=True))
        self.hf.add_tokens(_added_tokens(tokens, types, USER_DEFINED, special=False))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    @staticmethod
    def piece_bytes(token: str) -> bytes:
        """Bytes of a normal byte-level token (same fallback as tokenizers' ByteLevel decoder)."""
        table = gpt2_byte_decoder()
        try:
            return bytes(table[c] for c in token)
        except KeyError:  # not a byte-level string: the token stands for its own text
            return token.encode()


def _added_tokens(
    tokens: Sequence[str], types: Sequence[int], kind: int, *, special: bool
) -> list[AddedToken]:
    """AddedTokens for every vocabulary entry of token type `kind`."""
    return [
        AddedToken(t, special=special, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == kind
    ]


def pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    """Return the HF pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` type `pre`.

    Unknown names get plain GPT-2 byte-level splitting.
    """
    if pre in _STARCODER_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_PATTERNS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


class _SentencePiece:
    """SentencePiece BPE through the `sentencepiece` package, from GGUF pieces."""

    def __init__(
        self, reader: gguf.GGUFReader, tokens: Sequence[str], types: Sequence[int]
    ) -> None:
        proto = _sentencepiece_proto(reader, tokens, types)
        self.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # SentencePiece does not know control tokens in text; split them out first.
        # User-defined pieces are left to SentencePiece, which matches them itself.
        specials = sorted(
            {t for t, k in zip(tokens, types, strict=True) if k in (CONTROL, UNKNOWN) and t},
            key=len,
            reverse=True,
        )
        self.special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.ids = {t: i for i, t in reversed(list(enumerate(tokens)))}

    def encode(self, text: str) -> list[int]:
        if self.special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self.special_re.finditer(text):
            ids += self.sp.encode(text[start : match.start()])
            ids.append(self.ids[match.group()])
            start = match.end()
        return ids + self.sp.encode(text[start:])

    @staticmethod
    def piece_bytes(token: str, kind: int) -> bytes:
        """Bytes of a normal/byte piece: '▁' is a space, '<0xNN>' is one raw byte."""
        if kind == BYTE:
            return bytes([int(token[3:-1], 16)])
        return token.replace("▁", " ").encode()


def _sentencepiece_proto(
    reader: gguf.GGUFReader, tokens: Sequence[str], types: Sequence[int]
) -> sp_pb2.ModelProto:
    """Assemble a SentencePiece BPE ModelProto from GGUF tokens, scores and types."""
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = sp_pb2.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = (
            kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
        )
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE  # llama.cpp's SPM tokenizer is the BPE algorithm
    trainer.byte_fallback = BYTE in types
    trainer.vocab_size = len(tokens)
    # Padding is left out: encoding never needs it, and GGUFs often reuse eos/unk for it.
    for kind_name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        setattr(trainer, f"{kind_name}_id", -1 if token_id is None else int(token_id))
        if token_id is not None:
            setattr(trainer, f"{kind_name}_piece", tokens[token_id])
    if trainer.unk_id < 0 and UNKNOWN in types:
        trainer.unk_id = list(types).index(UNKNOWN)
    norm = proto.normalizer_spec
    charsmap = _field(reader, "tokenizer.ggml.precompiled_charsmap")
    norm.name = "user_defined" if charsmap else "identity"
    if charsmap:
        norm.precompiled_charsmap = bytes(charsmap)
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(
        _field(reader, "tokenizer.ggml.remove_extra_whitespaces", False)
    )
    norm.escape_whitespaces = True
    return proto


class Tokenizer:
    """Text <-> token ids for a GGUF model, plus the special-token facts a server needs.

    Build with `Tokenizer.from_gguf(reader)` or `Tokenizer.from_file(path)`.
    """

    def __init__(self, reader: gguf.GGUFReader) -> None:
        """Build from an open GGUFReader (use `from_gguf` / `from_file`)."""
        self.kind: str = _field(reader, "tokenizer.ggml.model")
        self._tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
        n = len(self._tokens)
        self._types: list[int] = [
            int(t) for t in _field(reader, "tokenizer.ggml.token_type", [NORMAL] * n)
        ]
        if self.kind == "gpt2":
            merges = _field(reader, "tokenizer.ggml.merges", [])
            pre = _field(reader, "tokenizer.ggml.pre", "default")
            self._backend: _Backend = _ByteLevelBPE(self._tokens, self._types, merges, pre)
            self.strips_leading_space = False
        elif self.kind == "llama":
            backend = _SentencePiece(reader, self._tokens, self._types)
            self._backend = backend
            # SentencePiece's decode drops the space of its own dummy prefix.
            self.strips_leading_space = backend.add_dummy_prefix
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {self.kind!r}")
        self._bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
        self._eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
        self.add_bos: bool = bool(
            _field(reader, "tokenizer.ggml.add_bos_token", self.kind == "llama")
        )
        self.special_ids: frozenset[int] = frozenset(
            i for i, k in enumerate(self._types) if k in (CONTROL, UNKNOWN)
        )
        self.stop_ids: frozenset[int] = self._find_stop_ids(reader)
        self._bytes: list[bytes] = [self._compute_bytes(i) for i in range(n)]

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build the tokenizer described by an open GGUF file's metadata."""
        return cls(reader)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Open the GGUF file at `path` and build its tokenizer."""
        return cls(gguf.GGUFReader(path))

    def _find_stop_ids(self, reader: gguf.GGUFReader) -> frozenset[int]:
        """eos, the known end-of-turn tokens in this vocab, and GGUF's eot/eom ids."""
        first_id = {t: i for i, t in reversed(list(enumerate(self._tokens)))}
        stops = {first_id[t] for t in END_OF_TURN_TOKENS if t in first_id}
        for key in ("eos", "eot", "eom"):
            token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
            if token_id is not None and 0 <= token_id < len(self._tokens):
                stops.add(int(token_id))
        return frozenset(stops)

    def _compute_bytes(self, token_id: int) -> bytes:
        token, kind = self._tokens[token_id], self._types[token_id]
        if kind in (CONTROL, USER_DEFINED, UNKNOWN):
            return token.encode()
        if isinstance(self._backend, _ByteLevelBPE):
            return _ByteLevelBPE.piece_bytes(token)
        return _SentencePiece.piece_bytes(token, kind)

    # -- encoding -------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Return the token ids of `text`; special tokens written in it become their ids.

        add_bos: prepend bos; None uses the GGUF's tokenizer.ggml.add_bos_token.
        """
        ids = self._backend.encode(text)
        add = self.add_bos if add_bos is None else add_bos
        if add and self._bos_id is not None:
            ids = [self._bos_id, *ids]
        return ids

    # -- decoding -------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes token `token_id` contributes to the text (special tokens: their text)."""
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Return the text of `ids`; invalid UTF-8 becomes U+FFFD.

        skip_special_tokens drops control/unknown tokens. The first kept token
        contributes `first_token_bytes`, the others `token_bytes`.
        """
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        if not kept:
            return ""
        data = self.first_token_bytes(kept[0]) + b"".join(self._bytes[i] for i in kept[1:])
        return data.decode("utf-8", errors="replace")

    def first_token_bytes(self, token_id: int) -> bytes:
        """Bytes `token_id` contributes when it starts the decoded text.

        Same as `token_bytes`, except that SentencePiece models with a dummy
        prefix drop the leading space of a normal piece there, as
        SentencePiece's own decode does.
        """
        data = self._bytes[token_id]
        if self.strips_leading_space and self._types[token_id] == NORMAL:
            return data.removeprefix(b" ")
        return data

    # -- vocabulary facts -----------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        """Return the vocabulary string of `token_id` (byte-level / '▁' form, not text)."""
        return self._tokens[token_id]

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the GGUF defines none."""
        return None if self._bos_id is None else int(self._bos_id)

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the GGUF defines none."""
        return None if self._eos_id is None else int(self._eos_id)

    @property
    def bos_token(self) -> str:
        """Text of the bos token ('' if none), as chat templates expect."""
        return "" if self._bos_id is None else self._tokens[self._bos_id]

    @property
    def eos_token(self) -> str:
        """Text of the eos token ('' if none), as chat templates expect."""
        return "" if self._eos_id is None else self._tokens[self._eos_id]
