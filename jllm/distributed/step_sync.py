"""Multi-host steps: every process runs the same jitted programs over one mesh (SPMD), but
only process 0 schedules. Before each device step, process 0 broadcasts the step's host
inputs to the others (a collective of `jax.experimental.multihost_utils`, so over the
same runtime as the model's); they replay the step and discard its results.

One process (the usual case) sends nothing.
"""

from __future__ import annotations

import atexit
import logging
import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

STOP = "stop"


def _bucket(size: int) -> int:
    # Powers of two from 4 KiB: each payload size is a compiled broadcast of its own.
    return max(4096, 1 << (size - 1).bit_length())


class StepSync:
    """Process 0's step messages to the other processes of a `jax.distributed` run."""

    def __init__(self) -> None:
        self.num_processes = jax.process_count()
        self.is_leader = jax.process_index() == 0
        self.stopped = False
        if self.active and self.is_leader:
            # An offline script's process 0 simply exits; the others must hear of it.
            atexit.register(self.stop)

    @property
    def active(self) -> bool:
        return self.num_processes > 1

    def send(self, op: str, *args) -> None:
        """Process 0: the op and its host arguments (numpy arrays, plain values)."""
        if self.active and self.is_leader:
            self._broadcast(pickle.dumps((op, args), protocol=pickle.HIGHEST_PROTOCOL))

    def stop(self) -> None:
        """Process 0: releases the others (once; at engine shutdown or at exit) and leaves
        the run with them: the run is this one engine. Leaving now, not at exit, matters for
        the server, which a SIGTERM ends without exit hooks once uvicorn has shut down."""
        if self.active and self.is_leader and not self.stopped:
            self.stopped = True
            self.send(STOP)
            jax.distributed.shutdown()

    def receive(self) -> tuple[str, tuple]:
        """Other processes: the next op process 0 sent, waiting for it."""
        # Messages only ever come from process 0 of this job, over JAX's own channel.
        return pickle.loads(self._broadcast(b""))  # noqa: S301

    def _broadcast(self, payload: bytes) -> bytes:
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
        buffer = np.zeros(_bucket(size), np.uint8)
        buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
        return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size].tobytes()


def host_copy(tree):
    """Device results on the host. A result of a multi-host step is replicated but spans
    other processes' devices too; each process reads its own first copy."""

    def local(x):
        return x if x is None or x.is_fully_addressable else x.addressable_data(0)

    return jax.device_get(jax.tree.map(local, tree))
