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

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

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
        self, proto: sp_pb2.ModelProto, tokens: Sequence[str], types: Sequence[int]
    ) -> None:
        """proto: the SentencePiece model; tokens/types: the full vocabulary, which may
        extend past the proto with added tokens (matched here, like control tokens)."""
        self.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        # SentencePiece does not know control tokens in text; split them out first.
        # User-defined pieces are left to SentencePiece, which matches them itself,
        # except added tokens past the end of its model, which it does not know.
        n_proto = len(proto.pieces)
        specials = sorted(
            {
                t
                for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                if t and (k in (CONTROL, UNKNOWN) or i >= n_proto)
            },
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
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> sp_pb2.ModelProto:
    """Assemble a SentencePiece BPE ModelProto from GGUF tokens, scores and types."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
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
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(trainer, f"{kind_name}_id", -1 if token_id is None else int(token_id))
        if token_id is not None:
            setattr(trainer, f"{kind_name}_piece", tokens[token_id])
    if trainer.unk_id < 0 and UNKNOWN in types:
        trainer.unk_id = list(types).index(UNKNOWN)
    norm = proto.normalizer_spec
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    norm.name = "user_defined" if charsmap else "identity"
    if charsmap:
        norm.precompiled_charsmap = bytes(charsmap)
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    return proto


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class _Tokenizers:
    """A tokenizer.json run by HF `tokenizers` as it is (its own pre-tokenizer, added tokens)."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids


@dataclass
class _HFVocab:
    """What a Hugging Face tokenizer file says about its vocabulary."""

    kind: str
    tokens: list[str]
    types: list[int]
    backend: _Backend
    byte_level: bool
    bos_id: int | None = None  # defaults; tokenizer_config.json takes precedence
    eos_id: int | None = None
    auto_prefix: list[int] = field(default_factory=list)  # ids the post-processor prepends
    add_dummy_prefix: bool = False


def _mentions(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains type `kind`."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, kind) for v in node)
    return False


def _tokenizers_vocab(file: Path) -> _HFVocab:
    """Vocabulary and backend of a tokenizer.json (byte-level BPE or SentencePiece-style)."""
    hf = HFTokenizer.from_file(str(file))
    spec = json.loads(file.read_text(encoding="utf-8"))
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    types = [UNUSED] * len(tokens)
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    byte_level = _mentions(spec.get("decoder"), "ByteLevel")
    if not byte_level and spec.get("model", {}).get("byte_fallback"):
        for i, token in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    # SentencePiece-style tokenizer.json files strip the dummy-prefix space on decode.
    decoder = json.dumps(spec.get("decoder"))
    strips = not byte_level and (
        '"Strip"' in decoder or _mentions(spec.get("pre_tokenizer"), "Metaspace")
    )
    return _HFVocab(
        kind="tokenizers",
        tokens=tokens,
        types=types,
        backend=_Tokenizers(hf),
        byte_level=byte_level,
        auto_prefix=hf.encode("", add_special_tokens=True).ids,
        add_dummy_prefix=strips,
    )


def _sentencepiece_file_vocab(file: Path, tok_config: dict[str, Any]) -> _HFVocab:
    """Vocabulary and backend of a tokenizer.model, extended by tokenizer_config's added tokens."""
    proto = sp_pb2.ModelProto.FromString(file.read_bytes())
    tokens = [p.piece for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    added = {int(i): d for i, d in tok_config.get("added_tokens_decoder", {}).items()}
    for i in sorted(i for i in added if i >= len(proto.pieces)):
        tokens += [""] * (i + 1 - len(tokens))
        types += [UNUSED] * (i + 1 - len(types))
        tokens[i] = added[i]["content"]
        types[i] = CONTROL if added[i].get("special") else USER_DEFINED
    trainer = proto.trainer_spec
    return _HFVocab(
        kind="llama",
        tokens=tokens,
        types=types,
        backend=_SentencePiece(proto, tokens, types),
        byte_level=False,
        bos_id=trainer.bos_id if trainer.bos_id >= 0 else None,
        eos_id=trainer.eos_id if trainer.eos_id >= 0 else None,
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


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
        backend: _Backend,
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
        kind: str = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
        backend: _Backend
        if kind == "gpt2":
            merges = meta.get("tokenizer.ggml.merges", [])
            pre = meta.get("tokenizer.ggml.pre", "default")
            backend = _ByteLevelBPE(tokens, types, merges, pre)
        elif kind == "llama":
            backend = _SentencePiece(_sentencepiece_proto(meta, tokens, types), tokens, types)
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
        tok_config = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            vocab = _tokenizers_vocab(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            vocab = _sentencepiece_file_vocab(path / "tokenizer.model", tok_config)
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
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        n_model = _read_json(path / "config.json").get("vocab_size", 0)
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
            return _ByteLevelBPE.piece_bytes(token)
        return _SentencePiece.piece_bytes(token, kind)

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
