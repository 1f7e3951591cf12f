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
import os
import sys
import time
from typing import NoReturn

import numpy as np

from .errors import UnsupportedError

MODES = ("auto", "mpi", "none")
# set by MPI launchers in every process they start: Open MPI, MPICH/Intel MPI (hydra) and Slurm's PMI2,
# MVAPICH; PMIx launches (srun --mpi=pmix) set PMIX_RANK and Slurm the step's task count
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names) -> int | None:
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def launched_size() -> int:
    """The number of processes an MPI launcher started this one with (1 when not launched by one)."""
    size = _env_int(_SIZE_VARS)
    if size is None and "PMIX_RANK" in os.environ:
        size = _env_int(("SLURM_STEP_NUM_TASKS",))
    return size or 1


def local_size() -> int:
    """Processes of this launch on this machine (1 when not launched by MPI)."""
    if launched_size() <= 1:
        return 1
    n = _env_int(_LOCAL_SIZE_VARS)
    if n is None:
        try:
            from mpi4py import MPI
        except ImportError:
            return 1
        n = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    return max(n, 1)


def default_threads() -> int | None:
    """CPU threads for one process: the cores it may use divided among the ranks on its machine, or None
    (ggml's own choice) when not launched by MPI."""
    n = local_size()
    if n <= 1:
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, min(usable, (os.cpu_count() or 1) // n))


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


__all__ = ["Communicator", "MPICommunicator", "communicator", "default_threads", "launched_size", "local_size"]
