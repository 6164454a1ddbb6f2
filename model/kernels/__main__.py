"""`python -m model.kernels [--portable]`: compile the kernels for this source and this
CPU (`--portable`: for any x86-64 CPU, as a container image needs); a no-op if they are."""

import subprocess
import sys

from model.kernels import build

try:
    print(f"built {build(portable='--portable' in sys.argv[1:])}")
except (RuntimeError, subprocess.CalledProcessError) as error:
    # The server still runs without them (the pure-JAX path); say so and go on.
    print(f"jaxchat's CPU kernels were not built: {error}", file=sys.stderr)
