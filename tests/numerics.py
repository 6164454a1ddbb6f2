"""Which arithmetic the engine's products take on this CPU, for tests whose tolerances
depend on it."""

from gguf import GGMLQuantizationType

from model import kernels


def rounds_prompts(llm) -> bool:
    """Whether the engine's products round a prompt's tokens to 16-bit integers (the
    quantized kernel, on a CPU with AVX-512 VNNI or AVX2; elsewhere they take f32): each
    token's norms, products and attention are then the same to the bit in any step."""
    return llm.engine.kernel is not None and kernels.int_gemm_path(GGMLQuantizationType.Q4_1)
