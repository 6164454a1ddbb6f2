"""functions-framework source: `functions-framework --target=app --source=main.py`."""

import os

from handler.app import make_handler
from handler.settings import Settings

# functions-framework reads THREADS for gunicorn's gthread pool when it starts the
# server, which is after it imports this file. Every open stream holds a thread
# for its whole duration, so the default (4 per CPU) would cap concurrent streams
# far below the engine's decode batch.
os.environ.setdefault("THREADS", "64")

app = make_handler(Settings())
