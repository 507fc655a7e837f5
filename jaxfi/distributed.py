"""Campaigns over several processes and hosts: joining JAX's distributed runtime.

``initialize()`` (or the absl flags from ``define_flags()``, read by
``initialize_from_flags()``) starts the runtime; campaigns then deal each
chunk's trials over every process's devices. ``docs/distributed.md`` shows how
to launch on one machine, on Slurm and on a TPU pod slice.
"""

from jaxfi._src.distributed import define_flags, initialize, initialize_from_flags

__all__ = ["define_flags", "initialize", "initialize_from_flags"]
