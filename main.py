"""functions-framework source: `functions-framework --target=app --source=main.py`."""

import importlib.util
import os

from handler.app import make_handler
from handler.settings import Settings

# functions-framework reads THREADS for gunicorn's gthread pool when it starts the
# server, which is after it imports this file. Every open stream holds a thread
# for its whole duration, so the default (4 per CPU) would cap concurrent streams
# far below the engine's decode batch.
os.environ.setdefault("THREADS", "64")

settings = Settings()
# functions-framework builds gunicorn's configuration from its defaults and a few
# variables, with no way to pass the keep-alive timeout (gunicorn's default, 2 s, is
# shorter than clients keep an idle pooled connection); its Config reads this default.
if importlib.util.find_spec("gunicorn") is not None:
    import gunicorn.config

    gunicorn.config.Keepalive.default = settings.keep_alive

app = make_handler(settings)
