"""JAX's persistent compilation cache, so a restart loads executables instead of compiling."""

from pathlib import Path

import jax


def enable_compile_cache(path: str | None) -> None:
    """Cache every compiled executable under `path` (a local directory; None: off).

    Every executable is cached, however fast it compiled or small it is (JAX's
    defaults skip those under a second), so a warm restart compiles nothing.
    """
    if not path:
        return
    Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
