"""Where weights come from and how they become one parameter tree: GGUF, Hugging Face
safetensors, Orbax checkpoints, prepared copies, model URIs and Cloud Storage."""
