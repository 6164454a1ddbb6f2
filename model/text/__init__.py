"""Text in and out, without JAX: tokenizer, chat template, streaming text, tool calls, grammar."""
