"""The tokenizer and chat template that a GGUF file's metadata describes, built from the
metadata alone (a dict, as model/weights/gguf.py reads it or a prepared copy keeps it),
so that a model served from a prepared copy never imports the GGUF reader."""

from typing import Any

from model.text.chat_template import ChatTemplate
from model.text.tokenizer import Tokenizer


def text_from_metadata(meta: dict[str, Any]) -> tuple[Tokenizer, ChatTemplate]:
    """The tokenizer and chat template that GGUF metadata describes."""
    tokenizer = Tokenizer.from_metadata(meta)
    return tokenizer, ChatTemplate.from_metadata(meta, tokenizer)
