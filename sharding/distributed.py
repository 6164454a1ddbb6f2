"""Joining a multi-host slice: `jax.distributed.initialize()` only when configured.

With no arguments, `jax.distributed.initialize()` auto-detects its coordinator,
process count and process id on these clusters (jax/_src/clusters):
- Cloud TPU on GKE: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES), a comma
  list of the slice's hosts, plus TPU_WORKER_ID; multislice adds
  MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID.
- Cloud TPU VMs on GCE (`gcloud compute tpus tpu-vm` / queued resources): the
  metadata server (agent-worker-number, worker-network-endpoints). Nothing in
  the environment shows this cheaply, so such slices set JAXCHAT_DISTRIBUTED=1.
- Slurm (SLURM_JOB_ID, …), Open MPI (OMPI_MCA_orte_hnp_uri), Kubernetes with
  the `kubernetes` package; elsewhere JAX_COORDINATOR_ADDRESS plus explicit
  process counts.
It must run before anything touches the XLA backend (even `jax.devices()`).
"""

import os
from collections.abc import Mapping

import jax


def distributed_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one host of a multi-host run.

    JAXCHAT_DISTRIBUTED=1 forces it, =0 forbids it; otherwise it is on for a
    multislice TPU (MEGASCALE_COORDINATOR_ADDRESS) or a GKE TPU slice listing
    more than one host. A single-host TPU VM lists one host (or none): no
    coordinator is needed there.
    """
    env = os.environ if environ is None else environ
    flag = env.get("JAXCHAT_DISTRIBUTED", "").strip()
    if flag:
        return flag == "1"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize()` once if `distributed_requested`.

    Idempotent: a second call (or one after someone else initialised) does
    nothing. Returns whether the distributed system is up.
    """
    if jax.distributed.is_initialized():
        return True
    if not distributed_requested(environ):
        return False
    jax.distributed.initialize()
    return True
