"""Where limits, usage and cached replies live: `open_store(settings)`.

With `JAXCHAT_STATE_URL` unset the state is embedded (handler/state/embedded.py):
buckets and cached replies in this process, usage in a SQLite file under
`JAXCHAT_STATE_DIR`. With `JAXCHAT_STATE_URL=redis://…` every instance shares
them through Redis (handler/state/redis.py).
"""

from pathlib import Path

from handler.quota import Store
from handler.settings import Settings


def open_store(settings: Settings) -> Store:
    """The store the settings name."""
    if settings.state_url:
        from handler.state.redis import RedisStore

        return RedisStore(
            settings.state_url,
            cache_ttl=settings.response_cache_ttl,
            cache_entries=settings.response_cache_max_entries,
            cache_bytes=settings.response_cache_max_bytes,
        )
    from handler.state.embedded import EmbeddedStore

    return EmbeddedStore(
        Path(settings.state_dir).expanduser(),
        cache_ttl=settings.response_cache_ttl,
        cache_entries=settings.response_cache_max_entries,
        cache_bytes=settings.response_cache_max_bytes,
    )
