"""A GGUF file's tokenizer and chat template, for tests that read them from a file."""

import os

from model.text.chat_template import ChatTemplate
from model.text.metadata import text_from_metadata
from model.text.tokenizer import Tokenizer
from model.weights.gguf import GGUFFile, read_metadata


def gguf_text(path: str | os.PathLike[str]) -> tuple[Tokenizer, ChatTemplate]:
    """The tokenizer and chat template the GGUF file at `path` describes."""
    return text_from_metadata(read_metadata(GGUFFile(path)))


def gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer the GGUF file at `path` describes."""
    return gguf_text(path)[0]
