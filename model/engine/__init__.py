"""Compiled serving: the engine's step over the paged KV pool, its variants and executable
store, the pool's blocks and prefix cache, and the scheduler thread (continuous batching)."""
