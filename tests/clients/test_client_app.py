"""The ClientApp's train handler with built Messages and Contexts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import make_client_app, node_partition, train_handler
from fl_attack.config import ScenarioConfig, load_scenario
from fl_attack.simulation import (
    build_scenario_model,
    client_partition,
    load_federated_data,
    pick_batch,
    read_audit,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
NODE_ID = 4242


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    """Messages can be built."""


@pytest.fixture
def scenario(tmp_path: Path) -> ScenarioConfig:
    """The default scenario, writing into a temporary folder."""
    return load_scenario(
        REPO / "scenarios" / "default.toml",
        {"run.out-dir": str(tmp_path), "run.name": "client-test"},
    )


def _make_context(partition_id: int | None = 1, num_partitions: int = 8) -> Context:
    """A node context as the runtime builds it."""
    node_config = (
        {}
        if partition_id is None
        else {
            "partition-id": partition_id,
            "num-partitions": num_partitions,
        }
    )
    return Context(
        run_id=1, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config={}
    )


def _make_train_message(arrays: ArrayRecord, config: dict) -> Message:
    """A train message as FedAvg sends it."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=NODE_ID, message_type=MessageType.TRAIN)


def test_reply_holds_the_updated_arrays_and_metrics_only(scenario: ScenarioConfig) -> None:
    # Prepare
    fed = load_federated_data(scenario.data)
    model = build_scenario_model(scenario.model, fed)
    message = _make_train_message(ArrayRecord(model.state_dict()), {"lr": 0.01, "server-round": 2})
    partition = client_partition(fed, scenario.data, seed=0, partition_id=1, num_partitions=8)
    batch = pick_batch(partition, seed=0, server_round=2, partition_id=1, batch_size=1)
    expected = copy.deepcopy(model)
    train_step(expected, fed.images[batch], fed.labels[batch], lr=0.01)
    # Execute
    reply = make_client_app(scenario)(message, _make_context())
    # Assert: arrays after one float32 SGD step on the chosen image, and two metrics
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert dict(reply.content["metrics"]).keys() == {"num-examples", "loss"}
    assert reply.content["metrics"]["num-examples"] == 1
    for name, value in expected.state_dict().items():
        got = reply.content["arrays"][name].numpy()
        assert got.dtype == np.float32
        assert np.array_equal(got, value.numpy()), name


def test_audit_record_is_written_out_of_band(scenario: ScenarioConfig) -> None:
    # Prepare
    fed = load_federated_data(scenario.data)
    model = build_scenario_model(scenario.model, fed)
    message = _make_train_message(ArrayRecord(model.state_dict()), {"lr": 0.01, "server-round": 3})
    partition = client_partition(fed, scenario.data, seed=0, partition_id=5, num_partitions=8)
    batch = pick_batch(partition, seed=0, server_round=3, partition_id=5, batch_size=1)
    # Execute
    reply = train_handler(message, _make_context(partition_id=5), scenario)
    # Assert: the audit names the image; the reply carries nothing of it
    audit = read_audit(scenario.run.run_dir, 3, NODE_ID)
    assert audit is not None
    assert audit.indices == (int(batch[0]),) and audit.partition_id == 5
    assert audit.labels == (int(fed.labels[batch[0]]),) and audit.num_partitions == 8
    carried = [str(v) for record in reply.content.values() for v in dict(record)]
    assert not any(key in carried for key in ("indices", "labels", "partition-id", "label"))
    assert len(reply.content.config_records) == 0


def test_node_config_without_partition_says_how_to_start_the_supernode() -> None:
    with pytest.raises(ValueError, match='--node-config "partition-id=<i> num-partitions=<n>"'):
        node_partition(_make_context(partition_id=None))
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        node_partition(_make_context(partition_id=8))


def test_a_train_config_without_lr_is_refused(scenario: ScenarioConfig) -> None:
    fed = load_federated_data(scenario.data)
    arrays = ArrayRecord(build_scenario_model(scenario.model, fed).state_dict())
    message = _make_train_message(arrays, {"server-round": 1})
    with pytest.raises(ValueError, match="lacks lr"):
        train_handler(message, _make_context(), scenario)


def test_same_round_and_partition_train_on_the_same_image(scenario: ScenarioConfig) -> None:
    # Prepare
    fed = load_federated_data(scenario.data)
    arrays = ArrayRecord(build_scenario_model(scenario.model, fed).state_dict())
    config = {"lr": 0.01, "server-round": 1}
    # Execute
    first = train_handler(_make_train_message(arrays, config), _make_context(), scenario)
    second = train_handler(_make_train_message(arrays, config), _make_context(), scenario)
    # Assert
    for name in first.content["arrays"]:
        assert torch.equal(
            torch.from_numpy(first.content["arrays"][name].numpy()),
            torch.from_numpy(second.content["arrays"][name].numpy()),
        )
