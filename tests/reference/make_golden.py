"""Write the golden fixtures that tests compare jaxchat against.

The reference is Hugging Face transformers (torch, float32) loading the same
GGUF file that jaxchat serves by default. This script is run by hand, not by
the tests, in an environment with the reference stack installed:

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 \
        transformers accelerate gguf sentencepiece tokenizers jinja2 numpy
    /tmp/ref/bin/python tests/reference/make_golden.py --gguf PATH/TO/model.gguf

It writes tests/fixtures/smollm2_golden.json (token ids, greedy continuations,
tokenizer and chat-template outputs) and tests/fixtures/smollm2_logits.npz
(reference logits at every prompt position: the top 32 entries and a fixed
random subset of 512 vocabulary ids).
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

PROMPT_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one line."},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "List three prime numbers and explain why they are prime."},
    ],
]

TEMPLATE_CONVERSATIONS = PROMPT_CONVERSATIONS + [
    [{"role": "system", "content": "Only a system message."}],
    [
        {"role": "user", "content": "Ünïcödé 😀 and\ttabs\n\nnewlines"},
        {"role": "assistant", "content": "Sure: <b>bold</b> {{ not jinja }}"},
    ],
]

HARD_STRINGS = [
    "Hello, world!",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\n\n\nthree newlines\r\nwindows",
    "tabs\tand\t\tmore\ttabs",
    "Ünïcödé çåñ bé tríçký: naïve café résumé",
    "Emoji: 😀🎉👩‍👩‍👧‍👦🇫🇷 and ❤️",
    "中文字符和日本語のテキスト、한국어도",
    "Ελληνικά και русский текст",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12345))",
    '{"key": [1, 2.5, -3e10], "nested": {"a": null}}',
    "1234567890 3.14159 1,000,000",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "don't won't it's we'll I'm they've you'd",
    "    indented\n        more indented",
    "ALL CAPS and MiXeD cAsE",
    "a" * 50,
    "",
]

LOGIT_SUBSET = 512
TOP = 32


def load(gguf_path: str):
    directory, filename = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    tokenizer, model = load(args.gguf)

    rng = np.random.default_rng(0)
    vocab = model.nn.config.vocab_size
    subset = np.sort(rng.choice(vocab, size=LOGIT_SUBSET, replace=False)).astype(np.int32)

    prompts, arrays = [], {"subset_ids": subset}
    for i, conversation in enumerate(PROMPT_CONVERSATIONS):
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=[],  # never stop early: compare all tokens
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
        top_ids = np.argsort(-logits, axis=-1)[:, :TOP].astype(np.int32)
        arrays[f"p{i}_top_ids"] = top_ids
        arrays[f"p{i}_top_logits"] = np.take_along_axis(logits, top_ids, axis=-1)
        arrays[f"p{i}_subset_logits"] = logits[:, subset]
        prompts.append({"messages": conversation, "text": text, "ids": ids, "greedy": out})

    tokenizer_cases = []
    for s in HARD_STRINGS:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        tokenizer_cases.append(
            {
                "text": s,
                "ids": ids,
                "decoded": tokenizer.decode(ids),
                "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
            }
        )

    templates = []
    for conversation in TEMPLATE_CONVERSATIONS:
        for gen in (True, False):
            templates.append(
                {
                    "messages": conversation,
                    "add_generation_prompt": gen,
                    "text": tokenizer.apply_chat_template(
                        conversation, tokenize=False, add_generation_prompt=gen
                    ),
                }
            )

    golden = {
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32",
        "model_file": os.path.basename(args.gguf),
        "prompts": prompts,
        "tokenizer": tokenizer_cases,
        "chat_template": templates,
    }
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / "smollm2_golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False))
    np.savez_compressed(FIXTURES / "smollm2_logits.npz", **arrays)
    print("wrote", FIXTURES)


if __name__ == "__main__":
    main()
