"""Write the reference distributions that quantized serving is measured against.

The reference is Hugging Face transformers (torch, float32) on the GGUF jaxchat
serves by default, as for make_golden.py (same environment, run by hand):

    /tmp/ref/bin/python tests/reference/make_quality.py --gguf PATH/TO/model.gguf

For each golden prompt (tests/fixtures/smollm2_golden.json: its chat text's token
ids followed by the reference's greedy continuation), it runs one forward pass and
keeps, at every position, the TOP most likely next tokens and their exact
log-probabilities (log-softmax over the whole vocabulary). It writes
tests/fixtures/smollm2_quality.npz: p{i}_ids [T], p{i}_top_ids [T, TOP],
p{i}_top_logprobs [T, TOP]. benchmarks/quality.py and tests/test_quality.py compare
jaxchat's (and llama.cpp's) next-token distributions with these.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TOP = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    directory, filename = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model.eval()
    golden = json.loads((FIXTURES / "smollm2_golden.json").read_text())
    arrays = {}
    for i, prompt in enumerate(golden["prompts"]):
        ids = list(prompt["ids"]) + list(prompt["greedy"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1).numpy()  # [T, V]
        top = np.argsort(-logprobs, axis=-1)[:, :TOP].astype(np.int32)
        arrays[f"p{i}_ids"] = np.asarray(ids, np.int32)
        arrays[f"p{i}_top_ids"] = top
        arrays[f"p{i}_top_logprobs"] = np.take_along_axis(logprobs, top, -1).astype(np.float32)
    np.savez_compressed(FIXTURES / "smollm2_quality.npz", **arrays)
    print(f"wrote {FIXTURES / 'smollm2_quality.npz'}: {len(golden['prompts'])} prompts")


if __name__ == "__main__":
    main()
