"""ThreadPolicy's count of the ranks that share this machine."""

from types import SimpleNamespace

import pytest

from dqrm_lightning.callbacks import threads


@pytest.mark.parametrize(
    ("num_nodes", "hosts", "expected"),
    [
        (1, None, 4),  # one node: the trainer's devices, no collective
        (2, ["a", "b", "a", "b"], 2),  # two machines, 2 ranks each
        (2, ["a", "a", "a", "a"], 4),  # two "nodes" packed on one machine share its cores
        (4, ["a", "b", "c", "d"], 1),
    ],
)
def test_ranks_on_this_host_counts_the_ranks_with_this_host_name(monkeypatch, num_nodes, hosts, expected):
    monkeypatch.setattr(threads.socket, "gethostname", lambda: "a")
    monkeypatch.setattr(threads.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(threads.dist, "get_world_size", lambda: 4)

    def all_gather_object(out, value):
        assert hosts is not None, "a one-node run needs no collective"
        assert value == "a"
        out[:] = hosts

    monkeypatch.setattr(threads.dist, "all_gather_object", all_gather_object)
    trainer = SimpleNamespace(num_nodes=num_nodes, num_devices=4 // num_nodes if hosts else 4)
    assert threads.ranks_on_this_host(trainer) == expected
