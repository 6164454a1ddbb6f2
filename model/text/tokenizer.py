"""Tokenizer from the metadata of a GGUF file or the files of a Hugging Face directory.

GGUF stores the vocabulary itself (tokens, token types, BPE merges or
SentencePiece scores), so no tokenizer.json / tokenizer.model is needed. Two
backends, chosen by `tokenizer.ggml.model`:

* ``gpt2``: byte-level BPE run by Hugging Face `tokenizers`, with the
  pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
* ``llama``: SentencePiece, from a ModelProto assembled from the GGUF pieces.

A Hugging Face directory gives `tokenizer.json`, run by `tokenizers` as it is,
or `tokenizer.model`, run by SentencePiece; `tokenizer_config.json` adds
bos/eos and added tokens.

Decoding is done here, from per-token bytes, for both backends: that keeps
`Tokenizer.decode` and the streaming `IncrementalDetokenizer` byte-for-byte
consistent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from model.text.backends import (
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Backend,
    ByteLevelBPE,
    SentencePiece,
    read_json,
    sentencepiece_file_vocab,
    sentencepiece_proto,
    tokenizers_vocab,
)

# Tokens that end an assistant turn in common chat formats.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Tokenizer:
    """Text <-> token ids for a model, plus the special-token facts a server needs.

    Build with `Tokenizer.from_metadata(gguf_metadata)` (model/weights/gguf.py reads a
    file's) or `Tokenizer.from_hf_dir(directory)`.
    """

    def __init__(
        self,
        *,
        kind: str,
        tokens: Sequence[str],
        types: Sequence[int],
        backend: Backend,
        byte_level: bool,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        strips_leading_space: bool,
        extra_stop_ids: Iterable[int | None] = (),
    ) -> None:
        """Assemble from a vocabulary (tokens and their SentencePiece-numbered types)
        and an encoding backend; prefer the `from_*` constructors.

        byte_level: tokens are GPT-2 byte-level strings (else '▁'/'<0xNN>' pieces).
        strips_leading_space: decode drops the leading space of the first normal
        piece, as SentencePiece does for its dummy prefix.
        extra_stop_ids: stop ids besides eos and the known end-of-turn tokens.
        """
        self.kind = kind
        self._tokens = list(tokens)
        self._types = [int(t) for t in types]
        self._backend = backend
        self._byte_level = byte_level
        self.strips_leading_space = strips_leading_space
        self._bos_id, self._eos_id = bos_id, eos_id
        self.add_bos = add_bos
        n = len(self._tokens)
        self.special_ids: frozenset[int] = frozenset(
            i for i, k in enumerate(self._types) if k in (CONTROL, UNKNOWN)
        )
        first_id = {t: i for i, t in reversed(list(enumerate(self._tokens)))}
        stops = {first_id[t] for t in END_OF_TURN_TOKENS if t in first_id}
        stops.update(i for i in (eos_id, *extra_stop_ids) if i is not None and 0 <= i < n)
        self.stop_ids: frozenset[int] = frozenset(int(i) for i in stops)
        self._bytes: dict[int, bytes] = {}  # filled on use: 49k tokens take 0.2 s up front

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer described by GGUF metadata (key → value)."""
        kind: str = meta["tokenizer.ggml.model"]
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
        backend: Backend
        if kind == "gpt2":
            merges = meta.get("tokenizer.ggml.merges", [])
            pre = meta.get("tokenizer.ggml.pre", "default")
            backend = ByteLevelBPE(tokens, types, merges, pre)
        elif kind == "llama":
            backend = SentencePiece(sentencepiece_proto(meta, tokens, types), tokens, types)
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {kind!r}")
        return cls(
            kind=kind,
            tokens=tokens,
            types=types,
            backend=backend,
            byte_level=kind == "gpt2",
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            strips_leading_space=getattr(backend, "add_dummy_prefix", False),
            extra_stop_ids=[meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")],
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model directory.

        Reads `tokenizer.json` (HF `tokenizers`) or else `tokenizer.model`
        (SentencePiece); `tokenizer_config.json` for bos/eos, add_bos_token and
        added tokens; `generation_config.json` for extra eos ids; and pads the
        vocabulary with empty unused entries up to `config.json`'s vocab_size.
        """
        path = Path(path)
        tok_config = read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            vocab = tokenizers_vocab(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            vocab = sentencepiece_file_vocab(path / "tokenizer.model", tok_config)
        else:
            raise FileNotFoundError(f"{path} has neither tokenizer.json nor tokenizer.model")
        first_id = {t: i for i, t in reversed(list(enumerate(vocab.tokens)))}

        def token_id(key: str, default: int | None) -> int | None:
            token = tok_config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return first_id.get(token, default) if token else default

        bos_id = token_id("bos_token", vocab.bos_id)
        eos_id = token_id("eos_token", vocab.eos_id)
        auto_bos = bos_id is not None and vocab.auto_prefix[:1] == [bos_id]
        generation_eos = read_json(path / "generation_config.json").get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        n_model = read_json(path / "config.json").get("vocab_size", 0)
        pad = max(0, n_model - len(vocab.tokens))
        return cls(
            kind=vocab.kind,
            tokens=vocab.tokens + [""] * pad,
            types=vocab.types + [UNUSED] * pad,
            backend=vocab.backend,
            byte_level=vocab.byte_level,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=bool(tok_config.get("add_bos_token", auto_bos or vocab.kind == "llama")),
            strips_leading_space=vocab.add_dummy_prefix,
            extra_stop_ids=generation_eos or (),
        )

    def _compute_bytes(self, token_id: int) -> bytes:
        token, kind = self._tokens[token_id], self._types[token_id]
        if kind in (CONTROL, USER_DEFINED, UNKNOWN):
            return token.encode()
        if self._byte_level:
            return ByteLevelBPE.piece_bytes(token)
        return SentencePiece.piece_bytes(token, kind)

    # -- encoding -------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Return the token ids of `text`; special tokens written in it become their ids.

        add_bos: prepend bos; None uses the model's add_bos_token setting.
        """
        ids = self._backend.encode(text)
        add = self.add_bos if add_bos is None else add_bos
        if add and self._bos_id is not None:
            ids = [self._bos_id, *ids]
        return ids

    # -- decoding -------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes token `token_id` contributes to the text (special tokens: their text)."""
        data = self._bytes.get(token_id)
        if data is None:
            data = self._bytes[token_id] = self._compute_bytes(token_id)
        return data

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Return the text of `ids`; invalid UTF-8 becomes U+FFFD.

        skip_special_tokens drops control/unknown tokens. The first kept token
        contributes `first_token_bytes`, the others `token_bytes`.
        """
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        if not kept:
            return ""
        data = self.first_token_bytes(kept[0]) + b"".join(map(self.token_bytes, kept[1:]))
        return data.decode("utf-8", errors="replace")

    def first_token_bytes(self, token_id: int) -> bytes:
        """Bytes `token_id` contributes when it starts the decoded text.

        Same as `token_bytes`, except that SentencePiece models with a dummy
        prefix drop the leading space of a normal piece there, as
        SentencePiece's own decode does.
        """
        data = self.token_bytes(token_id)
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
        """Beginning-of-sequence id, or None if the model defines none."""
        return None if self._bos_id is None else int(self._bos_id)

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the model defines none."""
        return None if self._eos_id is None else int(self._eos_id)

    @property
    def bos_token(self) -> str:
        """Text of the bos token ('' if none), as chat templates expect."""
        return "" if self._bos_id is None else self._tokens[self._bos_id]

    @property
    def eos_token(self) -> str:
        """Text of the eos token ('' if none), as chat templates expect."""
        return "" if self._eos_id is None else self._tokens[self._eos_id]
