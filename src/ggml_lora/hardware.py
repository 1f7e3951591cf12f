"""What this machine and this build of ggml-lora have: ggml devices, the CPU's instruction sets, free memory.

Facts only; the choices made from them (which device, which precision path) live in :mod:`ggml_lora.policy`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._native import check, ffi, lib


@dataclass(frozen=True)
class Device:
    name: str            # pass this as device=
    description: str
    type: str            # "cpu", "gpu", "igpu" or "accel"
    memory_free: int     # bytes
    memory_total: int    # bytes


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def devices() -> list[Device]:
    """The ggml devices this build of ggml-lora has."""
    out = []
    info = ffi.new("glora_device_info *")
    for i in range(lib.glora_device_count()):
        check(lib.glora_device_get(i, info))
        out.append(Device(ffi.string(info.name).decode(), ffi.string(info.description).decode(),
                          _DEVICE_TYPES.get(info.type, "cpu"), int(info.memory_free), int(info.memory_total)))
    return out


def device(name: str) -> Device | None:
    """The device called ``name`` (as ggml names it, compared without case), or None."""
    return next((d for d in devices() if d.name.lower() == name.lower()), None)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (Intel Sapphire Rapids and later) and Linux let this
    process use them: where ``amx_bf16`` products (``TrainingConfig.amx_bf16``, ``BaseModel.set_amx_bf16``) run."""
    return bool(lib.glora_cpu_has_amx_bf16())


def cpu_features() -> dict[str, str]:
    """The instruction sets ggml-lora's own ggml was built for (ggml's CPU feature list, as llama.cpp's system
    info prints it), e.g. ``{"AVX2": "1", "FMA": "1", "AVX512": "1", "AMX_INT8": "1", ...}``: with
    ``GGML_NATIVE``, what this machine has; with ``GGML_LORA_AVX2_ONLY``, AVX2, FMA and F16C whatever it has."""
    n = lib.glora_cpu_features(ffi.NULL, 0)
    buf = ffi.new("char[]", n + 1)
    lib.glora_cpu_features(buf, n + 1)
    text = ffi.string(buf).decode("ascii", "replace")
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- what an MPI launch gives this process ----------------------------------------------------------

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
