"""Data-parallel training over MPI (mpi4py).

Each process (rank) holds the whole frozen base model and the whole adapter. An optimizer step's rows are
the rows one process would have used with ``batch_size × gradient_accumulation_steps × processes`` rows
per step (same seed, same order); rank r trains on the r-th contiguous share of them. The LoRA gradients
and the loss are then summed across ranks (MPI Allreduce), and clipping and AdamW run on every rank on
the same numbers, so every rank holds the same adapter after every step; rank 0 alone writes files.

MPI is used only when the process was started by an MPI launcher with more than one process
(``mpiexec -n 2 ...``, ``srun``), or when asked for (``distributed="mpi"``). No transport of our own.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import NoReturn

import numpy as np

from .errors import DistributedError, UnsupportedError

MODES = ("auto", "mpi", "none")
from .hardware import default_threads, launched_size, local_size  # noqa: F401  (this module's API)


class Communicator:
    """The processes of one training run. This base class is the single process: rank 0 of 1."""

    kind = "none"
    rank = 0
    size = 1

    def allreduce(self, array: np.ndarray) -> None:
        """Sum ``array`` (contiguous, float32 or float64) over every rank, in place."""

    def allgather(self, value) -> list:
        return [value]

    def abort(self, message: str) -> NoReturn:   # pragma: no cover - only reached under MPI
        raise RuntimeError(message)


class MPICommunicator(Communicator):
    kind = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise UnsupportedError(
                f"distributed training needs mpi4py ({e}): pip install \"ggml-lora[mpi]\" (mpi4py with an MPICH "
                "wheel), or mpi4py built against your cluster's MPI; or set distributed='none'") from e
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("allreduce needs a contiguous array")
        self.comm.Allreduce(self._mpi.IN_PLACE, array, op=self._mpi.SUM)

    def allgather(self, value) -> list:
        return self.comm.allgather(value)

    def abort(self, message: str) -> NoReturn:
        """Say why on stderr, then end every rank of the job (MPI_Abort): never a hang in a collective."""
        sys.stderr.write(f"ggml-lora: rank {self.rank} of {self.size}: {message}\n"
                         f"ggml-lora: stopping all {self.size} ranks (MPI_Abort)\n")
        sys.stderr.flush()
        # MPICH's launcher relays a rank's stderr through its proxy, asynchronously: an MPI_Abort right after
        # the write could end the job before the proxy had read it (the message was lost in about 1 run of
        # 12 here). Half a second lets it through; the job is ending anyway.
        time.sleep(0.5)
        self.comm.Abort(1)
        raise SystemExit(1)      # not reached: Abort ends the process


def communicator(mode: str) -> Communicator:
    """The communicator for TrainingConfig.distributed: "none" one process; "mpi" MPI's world (mpi4py
    required); "auto" MPI when an MPI launcher started more than one process, else one process."""
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r}: must be one of {', '.join(MODES)}")
    if mode == "none" or (mode == "auto" and launched_size() <= 1):
        return Communicator()
    return MPICommunicator()


def digest(arrays) -> str:
    """A hash of arrays' bytes, to check that every rank holds the same ones."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def shard(comm: Communicator, rows_per_step: int, chosen: list, micro_batches):
    """(this process's micro-batches of a step's rows, the tokens of all of them, the supervised tokens of all
    of them or None in one process). Rank r takes the r-th run of ``rows_per_step`` rows: its micro-batches
    are those one process would make there (``micro_batches(rows, first_key)`` -> (batches, tokens))."""
    if comm.size == 1:
        return (*micro_batches(chosen), None)
    from .data import n_targets

    first = comm.rank * rows_per_step
    mine = micro_batches(chosen[first:first + rows_per_step], first_key=first)[0]
    return mine, sum(len(r.tokens) for r in chosen), sum(n_targets(r) for r in chosen)


def check_agreement(trainer, fingerprint: str, valid_fingerprint: str) -> None:
    """Every rank must train the same base model on the same data with the same settings."""
    import json

    comm = trainer.comm
    if comm.size == 1:
        return
    local = ("n_threads", "device", "progress", "report_to", "logging_dir", "run_name")   # may differ per host
    settings = [{k: v for k, v in trainer.config.to_dict().items() if k not in local}, trainer.lora_config.to_dict()]
    mine = {"data": fingerprint, "validation data": valid_fingerprint, "base model": trainer.model.sha256,
            "settings": digest([np.frombuffer(json.dumps(settings, sort_keys=True, default=str).encode(), np.uint8)])}
    everyone = comm.allgather(mine)
    differ = [k for k in mine if len({e[k] for e in everyone}) > 1]
    if differ:
        raise DistributedError(f"the {comm.size} processes disagree on their {', '.join(differ)}: "
                               + "; ".join(f"rank {r}: " + ", ".join(f"{k} {e[k][:12]}" for k in differ)
                                           for r, e in enumerate(everyone))
                               + ". Launch every rank with the same model, data and options")


def check_replicas(trainer, where: str) -> None:
    """Every rank must hold the same adapter, bit for bit (a hash of each rank's A and B, gathered)."""
    comm, adapter = trainer.comm, trainer.adapter
    if comm.size == 1:
        return
    h = digest(x for t in adapter.targets for x in adapter.get(t))
    everyone = comm.allgather(h)
    if len(set(everyone)) > 1:
        raise DistributedError(f"{where}: the ranks' adapters differ ("
                               + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(everyone))
                               + "); their steps no longer agree, training stopped. The last checkpoint is "
                               "loadable; report this with the launch command")


__all__ = ["Communicator", "check_agreement", "check_replicas", "shard", "MPICommunicator", "communicator", "default_threads", "launched_size", "local_size"]
