"""Tokenizer backends: how text becomes token ids for each vocabulary kind.

- `ByteLevelBPE`: GGUF `gpt2` vocabularies, run by Hugging Face `tokenizers` with the
  pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`;
- `SentencePiece`: GGUF `llama` vocabularies, from a ModelProto assembled from the
  pieces (`sentencepiece_proto`), or a Hugging Face `tokenizer.model`;
- `TokenizersBackend`: a Hugging Face `tokenizer.json` run as it is.

Decoding is not here: `Tokenizer` decodes from per-token bytes for every backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

# `sentencepiece` and its protobuf module are imported where a SentencePiece vocabulary
# is built (25 ms of the server's import, most models being byte-level BPE).

# GGUF token types; the numbering is SentencePiece's ModelProto.SentencePiece.Type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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


class Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteLevelBPE:
    """Byte-level BPE (GPT-2 style) through HF `tokenizers`."""

    def __init__(
        self, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: str
    ) -> None:
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)  # duplicates (rare padding entries): first id wins
        # Byte-level tokens never contain a real space, so the first space separates the pair.
        pairs = [(left, right) for left, right in (m.split(" ", 1) for m in merges)]
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


class SentencePiece:
    """SentencePiece BPE through the `sentencepiece` package, from GGUF pieces."""

    def __init__(
        self, proto: sp_pb2.ModelProto, tokens: Sequence[str], types: Sequence[int]
    ) -> None:
        """proto: the SentencePiece model; tokens/types: the full vocabulary, which may
        extend past the proto with added tokens (matched here, like control tokens)."""
        import sentencepiece as spm

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


def sentencepiece_proto(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> sp_pb2.ModelProto:
    """Assemble a SentencePiece BPE ModelProto from GGUF tokens, scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

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


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class TokenizersBackend:
    """A tokenizer.json run by HF `tokenizers` as it is (its own pre-tokenizer, added tokens)."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids


@dataclass
class HFVocab:
    """What a Hugging Face tokenizer file says about its vocabulary."""

    kind: str
    tokens: list[str]
    types: list[int]
    backend: Backend
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


def tokenizers_vocab(file: Path) -> HFVocab:
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
    return HFVocab(
        kind="tokenizers",
        tokens=tokens,
        types=types,
        backend=TokenizersBackend(hf),
        byte_level=byte_level,
        auto_prefix=hf.encode("", add_special_tokens=True).ids,
        add_dummy_prefix=strips,
    )


def sentencepiece_file_vocab(file: Path, tok_config: dict[str, Any]) -> HFVocab:
    """Vocabulary and backend of a tokenizer.model, extended by tokenizer_config's added tokens."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

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
    return HFVocab(
        kind="llama",
        tokens=tokens,
        types=types,
        backend=SentencePiece(proto, tokens, types),
        byte_level=False,
        bos_id=trainer.bos_id if trainer.bos_id >= 0 else None,
        eos_id=trainer.eos_id if trainer.eos_id >= 0 else None,
        add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
    )
