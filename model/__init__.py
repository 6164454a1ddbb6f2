"""jaxchat's model package: the network, generation and the Python API (no HTTP)."""

from model.llm import LLM, Completion
from model.sampling_params import Delta, SamplingParams

__all__ = ["LLM", "Completion", "Delta", "SamplingParams"]
