"""`python -m model.kernels`: compile the kernels for this source (a no-op if they are)."""

import subprocess
import sys

from model.kernels import build

try:
    print(f"built {build()}")
except (RuntimeError, subprocess.CalledProcessError) as error:
    # The server still runs without them (the pure-JAX path); say so and go on.
    print(f"jaxchat's CPU kernels were not built: {error}", file=sys.stderr)
