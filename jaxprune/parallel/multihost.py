"""Multi-host start-up: JAX's multi-process runtime from arguments or the environment."""

from __future__ import annotations

import os

import jax

from jaxprune.errors import InvalidArgumentError

ENV = {"coordinator": "JAXPRUNE_COORDINATOR", "num_processes": "JAXPRUNE_NUM_PROCESSES",
       "process_id": "JAXPRUNE_PROCESS_ID"}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo") -> bool:
    """Start JAX's multi-process runtime (`jax.distributed.initialize`), if asked.

    Arguments default to the environment: ``JAXPRUNE_COORDINATOR`` (host:port of process 0),
    ``JAXPRUNE_NUM_PROCESSES``, ``JAXPRUNE_PROCESS_ID``. With no coordinator and no
    environment this is a no-op (returns False), so single-machine runs are unchanged; on
    managed clusters (TPU pods, SLURM) pass ``coordinator="auto"`` to let JAX detect them.
    On CPU, cross-process collectives use `cpu_collectives` (gloo). Call before any other
    JAX work.
    """
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    if not coordinator:
        return False
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    if coordinator != "auto" and (num_processes is None or process_id is None):
        raise InvalidArgumentError(f"multi-host start-up needs the number of processes and this process's id "
                                   f"(--num-processes/--process-id or {ENV['num_processes']}/{ENV['process_id']})")
    if coordinator != "auto" and not 0 <= process_id < num_processes:
        raise InvalidArgumentError(f"process id {process_id} is outside [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True
