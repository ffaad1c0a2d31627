"""Thread pools sized to this process's share of the machine.

A training process runs three kinds of threads: torch's intra-op pool (OpenMP: FBGEMM's embedding kernels, MKL's
GEMMs), torch's inter-op pool, and pyarrow's CPU pool (raw-file parsing). Left at their defaults each one takes every
core, in every rank and every data-loader worker. On a machine whose cores are shared (several ranks, loader workers,
any other job) OpenMP teams then wait at every barrier for a thread that is not running, and throughput collapses
(measured on 2 cores: from 29,000 samples/s alone to about 100 next to one other training run;
benchmarks/results/contention.txt).

The policy (:func:`resolve`):

* ``cpus``: the cores this process may use: the CPU affinity mask, capped by the cgroup CPU quota (containers), not
  the machine's raw core count.
* each rank on this machine gets ``share = cpus // local_processes`` cores and runs
  ``max(1, share - max(1, loader_workers))`` intra-op threads: its loader workers are single-threaded and each takes
  one core of the share while it decodes a batch, and at least one core of the share stays outside the OpenMP team.
  That spare core is what keeps a run steady: an OpenMP team as wide as the cores stalls at every barrier as soon as
  any other process (a loader worker, another job, the OS) takes one of them. Measured on 2 cores, demo config: one
  thread trains at about 38,000 samples/s alone and 39,500 next to a busy loop; two threads at 38,000-41,000 alone
  and 10,300-10,800 next to the busy loop. OpenMP passive waiting (``OMP_WAIT_POLICY=PASSIVE``) was measured too and
  rejected: 24,000-26,000 next to the busy loop, but less than half the speed alone (every small parallel region
  pays a thread wake-up). Figures: benchmarks/README.md, "Throughput when the cores are shared".
* one inter-op thread (DLRM's graph is a chain: nothing runs on the inter-op pool).
* pyarrow gets the rank's share (it parses raw files before training starts, when no other pool is busy).

Overrides, strongest first: ``OMP_NUM_THREADS`` (the usual environment variable; not when Lightning's launcher
filled it in after ``dqrm`` started; torchrun sets it to 1 before, which counts) > ``threads`` (``dqrm --threads N``)
> the policy; an override sets pyarrow's pool too. The resolved numbers and where they came from go into
``summary.json`` (``threads``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

_CGROUP_ROOT = Path("/sys/fs/cgroup")
# "1" when OMP_NUM_THREADS came from the user, "0" when it was unset as `dqrm` started (Lightning's launcher then
# fills it in for the ranks it starts); inherited by every rank of the run.
_FROM_USER = "DQRM_OMP_NUM_THREADS_FROM_USER"


def remember_user_environment() -> None:
    """Note, at the start of ``dqrm``, whether ``OMP_NUM_THREADS`` is the user's (ranks started later inherit it)."""
    os.environ.setdefault(_FROM_USER, "1" if "OMP_NUM_THREADS" in os.environ else "0")


@dataclasses.dataclass(frozen=True)
class ThreadSettings:
    """The resolved thread counts of one process, and where each input came from."""

    cpus: int  # cores this process may use (affinity mask capped by the cgroup quota)
    cpus_from: str  # "affinity" or "cgroup quota"
    local_processes: int  # training ranks on this machine
    loader_workers: int  # data-loader worker processes per rank (each single-threaded)
    intra_op: int  # torch intra-op (OpenMP / MKL) threads of a rank
    inter_op: int  # torch inter-op threads of a rank
    arrow: int  # pyarrow CPU pool of a rank
    intra_op_from: str  # "policy", "--threads" or "OMP_NUM_THREADS"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (and its ancestors) in cores, or None when unlimited or unknown.

    Reads cgroup v2 ``cpu.max`` (``"quota period"`` or ``"max period"``) and cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``, from the process's own cgroup up to the root; the smallest limit wins.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base = root
            read = _cgroup_v2_limit
        elif "cpu" in controllers.split(","):
            base = next((root / name for name in ("cpu,cpuacct", "cpu") if (root / name).is_dir()), root / "cpu")
            read = _cgroup_v1_limit
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            limit = read(directory)
            if limit is not None:
                limits.append(limit)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def _cgroup_v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cgroup_v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def available_cpus() -> tuple[int, str]:
    """The cores this process may use, and which limit decided it ("affinity" or "cgroup quota")."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None and math.floor(quota) < affinity:
        return max(1, math.floor(quota)), "cgroup quota"
    return affinity, "affinity"


def local_processes_from_env(environ: dict[str, str] | os._Environ = os.environ) -> int:
    """Ranks on this machine as a launcher announces them (torchrun, SLURM), or 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(name, "")
        digits = value.split("(")[0]  # SLURM writes "2(x3)" for 3 nodes with 2 tasks each
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def check_threads(threads: int | None) -> None:
    """Raises ValueError unless ``threads`` is None (the policy decides) or at least 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"`threads` must be >= 1 or null (the policy decides), got {threads}")


def resolve(
    threads: int | None = None,
    local_processes: int = 1,
    loader_workers: int = 0,
    cpus: tuple[int, str] | None = None,
    environ: dict[str, str] | os._Environ = os.environ,
) -> ThreadSettings:
    """The thread counts of one rank (see the module docstring for the policy).

    Args:
        threads: intra-op threads asked for (``--threads``); None: the policy decides.
        local_processes: training ranks on this machine.
        loader_workers: data-loader worker processes per rank.
        cpus: ``(cores, source)``; default :func:`available_cpus`.
        environ: where ``OMP_NUM_THREADS`` is read.

    Raises:
        ValueError: ``threads`` below 1, or ``OMP_NUM_THREADS`` not a positive integer.
    """
    check_threads(threads)
    cores, cores_from = cpus if cpus is not None else available_cpus()
    local_processes = max(1, local_processes)
    share = max(1, cores // local_processes)
    intra, intra_from = max(1, share - max(1, loader_workers)), "policy"
    if threads is not None:
        intra, intra_from = threads, "--threads"
    env = environ.get("OMP_NUM_THREADS") if environ.get(_FROM_USER, "1") == "1" else None
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {env!r}")
        intra, intra_from = int(env), "OMP_NUM_THREADS"
    return ThreadSettings(
        cpus=cores,
        cpus_from=cores_from,
        local_processes=local_processes,
        loader_workers=max(0, loader_workers),
        intra_op=intra,
        inter_op=1,
        arrow=share if intra_from == "policy" else intra,
        intra_op_from=intra_from,
    )


def apply(settings: ThreadSettings) -> None:
    """Size this process's torch and pyarrow pools (pyarrow only if it is loaded; the inter-op pool only if it has
    not started yet: torch fixes it at its first use)."""
    import torch

    torch.set_num_threads(settings.intra_op)
    if torch.get_num_interop_threads() != settings.inter_op:
        # once started, torch refuses to resize it; it stays idle in DLRM training anyway
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(settings.inter_op)
    if "pyarrow" in sys.modules:
        import pyarrow

        pyarrow.set_cpu_count(settings.arrow)
        pyarrow.set_io_thread_count(max(1, settings.arrow))


def single_threaded_worker(worker_id: int) -> None:
    """``worker_init_fn`` of data-loader workers: one thread in every pool (torch already sets its intra-op pool)."""
    import torch

    torch.set_num_threads(1)
    if "pyarrow" in sys.modules:
        import pyarrow

        pyarrow.set_cpu_count(1)
        pyarrow.set_io_thread_count(1)
