"""The thread policy: the process's share of the CPUs (affinity, cgroup quota), ranks and loader workers, overrides."""

import os
from pathlib import Path

import pytest
import torch

from dqrm_lightning import threads


def _cgroup(tmp_path: Path, proc_line: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_limit_on_the_path_to_the_root(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        "0::/job/step",
        {"job/cpu.max": "250000 100000\n", "job/step/cpu.max": "max 100000\n", "cpu.max": "max 100000\n"},
    )
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(2.5)
    (root / "job/step/cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "100000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
    )
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(1.0)
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1")
    assert threads.cgroup_cpu_limit(root, proc) is None
    assert threads.cgroup_cpu_limit(root, tmp_path / "missing") is None


def test_available_cpus_follow_the_affinity_mask():
    cores, source = threads.available_cpus()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert source in ("affinity", "cgroup quota")


@pytest.mark.parametrize(
    ("cpus", "ranks", "workers", "intra"),
    [
        (2, 1, 0, 1),  # one core stays outside the OpenMP team
        (2, 1, 1, 1),
        (2, 2, 0, 1),
        (2, 2, 1, 1),
        (16, 1, 0, 15),
        (16, 1, 2, 14),
        (16, 2, 1, 7),
        (16, 4, 0, 3),
        (1, 1, 0, 1),
    ],
)
def test_policy_gives_each_rank_its_share_minus_its_loader_workers(cpus, ranks, workers, intra):
    settings = threads.resolve(None, ranks, workers, cpus=(cpus, "affinity"), environ={})
    assert settings.intra_op == intra
    assert settings.inter_op == 1
    assert settings.intra_op_from == "policy"
    assert 1 <= settings.arrow <= max(1, cpus // ranks)


def test_threads_argument_and_omp_num_threads_override_the_policy_environment_first():
    assert threads.resolve(3, cpus=(16, "affinity"), environ={}).intra_op == 3
    settings = threads.resolve(3, cpus=(16, "affinity"), environ={"OMP_NUM_THREADS": "5"})
    assert (settings.intra_op, settings.intra_op_from, settings.arrow) == (5, "OMP_NUM_THREADS", 5)
    with pytest.raises(ValueError, match="`threads` must be >= 1"):
        threads.resolve(0, environ={})
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer, got 'two'"):
        threads.resolve(None, environ={"OMP_NUM_THREADS": "two"})


def test_ranks_per_machine_from_the_launchers_environment():
    assert threads.local_processes_from_env({}) == 1
    assert threads.local_processes_from_env({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert threads.local_processes_from_env({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 2


def test_apply_sizes_torchs_pool():
    before = torch.get_num_threads()
    try:
        threads.apply(threads.resolve(1, environ={}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_set_by_a_launcher_after_dqrm_started_is_not_the_users():
    launcher_set = {"OMP_NUM_THREADS": "1", "DQRM_OMP_NUM_THREADS_FROM_USER": "0"}
    assert threads.resolve(None, cpus=(16, "affinity"), environ=launcher_set).intra_op_from == "policy"
    user_set = {"OMP_NUM_THREADS": "1", "DQRM_OMP_NUM_THREADS_FROM_USER": "1"}
    assert threads.resolve(None, cpus=(16, "affinity"), environ=user_set).intra_op_from == "OMP_NUM_THREADS"
