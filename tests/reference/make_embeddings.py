"""Write the embeddings fixture that tests/test_embeddings.py compares jaxchat against.

The reference is Hugging Face transformers (torch, float32) loading the same GGUF
file that jaxchat serves by default, pooled the way jaxchat pools (README
"Embeddings"): the mean over every input token of the final hidden states (the
model's last layer after its final RMSNorm, `last_hidden_state`), L2-normalised.
Run by hand, in the reference environment of tests/reference/make_golden.py:

    /tmp/ref/bin/python tests/reference/make_embeddings.py --gguf PATH/TO/model.gguf

It writes tests/fixtures/smollm2_embeddings.json: per sentence its text, its token
ids (the tokenizer's default special tokens, as jaxchat encodes input text) and the
reference embedding.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# Sentences 0 and 1 say the same thing in other words; 2 is about something else.
# The rest cover short input, code, non-Latin scripts and a longer paragraph.
SENTENCES = [
    "The cat sat on the mat and fell asleep in the afternoon sun.",
    "In the afternoon sunshine, a cat dozed off lying on the rug.",
    "Quarterly revenue grew by twelve percent, driven by cloud contracts.",
    "Paris",
    "def add(a, b):\n    return a + b",
    "Ünïcödé text, 中文字符, and emoji 😀 in one line.",
    " ".join(
        [
            "A language model reads text as a sequence of tokens and, at every position,",
            "computes a vector that summarises what came before. Averaging those vectors",
            "over a passage gives one fixed-size representation of the whole passage,",
            "which can be compared with others by their cosine similarity. Such vectors",
            "are used for search, clustering and retrieval-augmented generation, where a",
            "question's vector is matched against the vectors of many stored documents.",
        ]
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    directory, filename = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModel.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model.eval()

    cases = []
    for text in SENTENCES:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0]  # [T, D], after the norm
        mean = hidden.double().mean(0)
        vector = (mean / mean.norm()).tolist()
        cases.append({"text": text, "ids": ids, "embedding": [round(x, 8) for x in vector]})

    out = {
        "model_file": filename,
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "pooling": "mean of last_hidden_state over all tokens, L2-normalised",
        "cases": cases,
    }
    path = FIXTURES / "smollm2_embeddings.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
