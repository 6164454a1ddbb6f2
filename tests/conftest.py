"""Shared fixtures: the real default model, loaded once per test session."""

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# The e2e server process, shared by the e2e modules (started on first use).
# A Cloud Storage emulator process, per module that uses it.
from tests.gcs_emulator import emulator  # noqa: E402, F401
from tests.server_process import base_url, client  # noqa: E402, F401


@pytest.fixture(scope="session")
def golden() -> dict:
    """Reference outputs from HF transformers (tests/reference/make_golden.py)."""
    return json.loads((FIXTURES / "smollm2_golden.json").read_text())


@pytest.fixture(scope="session")
def golden_logits() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "smollm2_logits.npz") as data:
        return dict(data)


@pytest.fixture(scope="session")
def llm():
    """The bundled SmolLM2-135M-Instruct, float32, a 512-token context, 8 decode slots."""
    from model import LLM

    return LLM(max_seq_len=512, batch=8, dtype="float32")
