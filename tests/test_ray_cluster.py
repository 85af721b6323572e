"""Issue 13: a two-node local Ray cluster, joined by address: the driver's node has no CPU, so every task
runs on the other node and the models and batches really cross between nodes. Same model as --jobs 1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import DigitsExample, fix_first_hidden_layer
from ray.cluster_utils import Cluster


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_two_nodes_write_the_model_one_process_writes(two_nodes: Cluster, digits: DigitsExample) -> None:
    import ray

    two_node_bytes = fix_first_hidden_layer(digits, executor="ray", ray_address=two_nodes.address)
    assert two_node_bytes == fix_first_hidden_layer(digits, jobs=1)
    assert not ray.is_initialized()  # the run left the cluster it joined, and the cluster runs on
    ray.init(address=two_nodes.address, logging_level="ERROR")
    try:
        assert sum(node["Alive"] for node in ray.nodes()) == 2
    finally:
        ray.shutdown()
