"""functions-framework source: `functions-framework --target=app --source=main.py`."""

import gc
import importlib.util
import os

# Start-up makes about 140,000 objects that live as long as the process (modules,
# the model's tables): the cyclic collector's passes over them took 0.3 s of a warm
# start on a 2-core CPU, and a pass in a forked worker writes to the pages it shares
# with the gunicorn master. So the collector pauses from here until the serving
# process has loaded its model, and what exists then is frozen out of its passes
# (handler/model_host.py's `resume_collector`): the master freezes its own before it
# forks the worker, and resumes after.
gc.disable()

from handler.app import make_handler  # noqa: E402
from handler.settings import Settings  # noqa: E402

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
gc.freeze()
os.register_at_fork(after_in_parent=gc.enable)
