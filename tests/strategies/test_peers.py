"""PeerWatch (the heartbeats of a run's ranks) and the one line that names the ranks of a run that died."""

from types import SimpleNamespace

import pytest
import torch.distributed as dist

from dqrm_lightning.strategies.peers import PeerWatch

INTERVAL = 0.05


def test_the_ranks_whose_heartbeats_stop_are_named_with_their_node_and_host(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "n1")
    store = dist.HashStore()
    watches = [PeerWatch(store, rank, 3, node_rank=rank // 2, interval=INTERVAL) for rank in range(3)]
    watches[0].start()
    watches[1].start()  # rank 2 never starts
    try:
        assert watches[0].dead() == ["rank 2 (never started)"]
        watches[1].stop()
        assert not watches[1]._thread.is_alive()
        assert watches[0].dead() == ["rank 1 (node 0, host n1)", "rank 2 (never started)"]
        assert watches[2].dead() == ["rank 1 (node 0, host n1)"]  # rank 0 still beats
    finally:
        for watch in watches:
            watch.stop()


class _LostStore(dist.HashStore):
    def add(self, key, value):
        raise dist.DistStoreError("Connection reset by peer")


def test_an_unreachable_store_is_no_list_of_ranks():
    watch = PeerWatch(_LostStore(), 1, 2, node_rank=1, interval=INTERVAL)
    assert watch.dead() is None


def test_every_live_rank_beats_within_the_wait():
    store = dist.HashStore()
    watches = [PeerWatch(store, rank, 2, node_rank=rank, interval=0.2) for rank in range(2)]
    for watch in watches:
        watch.start()
    try:
        assert watches[0].dead() == []
    finally:
        for watch in watches:
            watch.stop()


class _Peers:
    def __init__(self, dead):
        self._dead = dead

    def dead(self):
        return self._dead


@pytest.mark.parametrize(
    ("dead", "line"),
    [
        ([], None),  # every rank alive: the error is this rank's own, reported as it is
        (
            ["rank 1 (node 1, host n2)", "rank 3 (node 1, host n2)"],
            "rank 1 (node 1, host n2), rank 3 (node 1, host n2) stopped (its process ended or its node was lost); "
            "the run stopped",
        ),
        (None, "lost the run's rendezvous store at 10.0.0.1:29500 (hosted on node 0): node 0 stopped; the run stopped"),
    ],
)
def test_the_cli_names_the_dead_ranks_in_one_line(monkeypatch, dead, line):
    from dqrm_lightning.cli import _name_dead_ranks

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    cli = SimpleNamespace(trainer=SimpleNamespace(strategy=SimpleNamespace(launcher=None, peers=_Peers(dead))))
    assert _name_dead_ranks(cli) == line


class _Exited:
    def __init__(self, code):
        self.code = code

    def wait(self, timeout):
        return self.code


@pytest.mark.parametrize(("node_rank", "rank"), [(0, 2), (1, 5)])
def test_ranks_started_by_lightning_s_launcher_are_named_by_global_rank(node_rank, rank):
    from dqrm_lightning.cli import _name_dead_ranks

    # 3 processes per node; this node's launcher started local ranks 1 and 2, and local rank 2 died
    launcher = SimpleNamespace(procs=[_Exited(0), _Exited(17)])
    strategy = SimpleNamespace(launcher=launcher, node_rank=node_rank, num_processes=3, peers=None)
    line = _name_dead_ranks(SimpleNamespace(trainer=SimpleNamespace(strategy=strategy)))
    assert line == f"rank {rank} terminated with code 17; the run stopped"
