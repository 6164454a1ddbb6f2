"""Greedy tokens of the golden prompts on several meshes; run by tests/test_mesh.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_greedy 8x1 2x4

Prints one JSON object: {mesh spec: [token ids per golden prompt]}. It runs in
its own process because XLA fixes the device count when its backend starts.
"""

import json
import sys
from pathlib import Path

from model import LLM, SamplingParams

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"


def main(specs: list[str]) -> None:
    prompts = json.loads(GOLDEN.read_text())["prompts"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for spec in specs:
        llm = LLM(max_seq_len=128, batch=8, mesh=spec)
        results[spec] = [list(llm.generate(p["ids"], params).token_ids) for p in prompts]
        llm.scheduler.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
