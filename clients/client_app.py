"""The honest clients: one partition each, one SGD step per round, an out-of-band audit.

``app`` is what ``flwr run`` loads (it reads the scenario from the run config);
``make_client_app(scenario)`` builds the same app around a parsed scenario for
``fl-attack run``. Both call :func:`train_handler`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fl_attack.config import ScenarioConfig, from_run_config
from fl_attack.defenses.mods import make_defense_mod
from fl_attack.simulation import (
    AuditRecord,
    build_scenario_model,
    client_partition,
    load_federated_data,
    pick_batch,
    train_step,
    write_audit,
)

__all__ = [
    "APP_DIR",
    "app",
    "defense_mod_for",
    "make_client_app",
    "node_partition",
    "train_handler",
]

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app's folder (the repository, or the unpacked FAB under ``flwr run``)."""

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def node_partition(context: Context) -> tuple[int, int]:
    """This node's ``(partition-id, num-partitions)`` from its node config.

    Raises
    ------
    ValueError
        If either is missing or out of range; the message shows the ``--node-config`` fix.
    """
    config = context.node_config
    missing = [key for key in (PARTITION_ID, NUM_PARTITIONS) if key not in config]
    if missing:
        raise ValueError(
            f"ClientApp: the node config lacks {', '.join(missing)}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>" (the Simulation runtime '
            "sets both itself)"
        )
    partition_id, num_partitions = int(config[PARTITION_ID]), int(config[NUM_PARTITIONS])
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"ClientApp: partition-id {partition_id} is outside 0..{num_partitions - 1}; fix "
            "the SuperNode's --node-config"
        )
    return partition_id, num_partitions


def train_handler(msg: Message, context: Context, scenario: ScenarioConfig) -> Message:
    """Train on this round's batch and reply with the updated arrays.

    Parameters
    ----------
    msg : Message
        The train message: ``arrays`` (the global model) and ``config`` with ``lr`` and
        ``server-round``.
    context : Context
        The node's context (node id, partition in the node config).
    scenario : ScenarioConfig
        The parsed scenario.

    Returns
    -------
    Message
        Reply with ``arrays`` (float32, the model after the local steps) and ``metrics``
        (``num-examples``, ``loss``). It carries no ground truth: the images used are
        appended to the audit record instead.

    Raises
    ------
    ValueError
        If the config lacks ``lr``/``server-round`` or the node config its partition.
    """
    config = msg.content["config"]
    missing = [key for key in ("lr", "server-round") if key not in config]
    if missing:
        raise ValueError(
            f"ClientApp.train: the train config lacks {', '.join(missing)}; the ServerApp must "
            "send train_config=ConfigRecord({'lr': ...}) (FedAvg adds server-round)"
        )
    lr, server_round = float(config["lr"]), int(config["server-round"])
    partition_id, num_partitions = node_partition(context)
    fed = load_federated_data(scenario.data)
    partition = client_partition(
        fed,
        scenario.data,
        seed=scenario.run.seed,
        partition_id=partition_id,
        num_partitions=num_partitions,
        min_size=scenario.client.batch_size,
    )
    batch = pick_batch(
        partition,
        seed=scenario.run.seed,
        server_round=server_round,
        partition_id=partition_id,
        batch_size=scenario.client.batch_size,
    )
    model = build_scenario_model(scenario.model, fed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = train_step(
        model,
        fed.images[batch],
        fed.labels[batch],
        lr=lr,
        local_steps=scenario.client.local_steps,
    )
    write_audit(
        scenario.run.run_dir,
        AuditRecord(
            server_round=server_round,
            node_id=int(context.node_id),
            partition_id=partition_id,
            num_partitions=num_partitions,
            indices=tuple(int(i) for i in batch),
            labels=tuple(int(fed.labels[i]) for i in batch),
        ),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(batch), "loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


def defense_mod_for(
    scenario: ScenarioConfig | None,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The client mod applying ``[defense]`` to each reply (a no-op for ``kind = "none"``).

    Parameters
    ----------
    scenario : ScenarioConfig, optional
        As for :func:`make_client_app`; ``None`` reads it from ``context.run_config``.

    Returns
    -------
    callable
        A Flower mod ``(msg, context, call_next) -> Message``; its noise is seeded by the
        run's seed, the round and the partition.
    """

    def defense_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        parsed = scenario
        if parsed is None:
            parsed = _scenario_for(tuple(sorted(context.run_config.items())))
        mod = make_defense_mod(parsed.defense, seed=parsed.run.seed)
        return call_next(msg, context) if mod is None else mod(msg, context, call_next)

    return defense_mod


@lru_cache(maxsize=8)
def _scenario_for(items: tuple[tuple[str, bool | int | float | str], ...]) -> ScenarioConfig:
    """Parse a run config once per process."""
    return from_run_config(dict(items), app_dir=APP_DIR)


def make_client_app(scenario: ScenarioConfig | None = None) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    scenario : ScenarioConfig, optional
        Used as is (``fl-attack run``); ``None`` parses ``context.run_config``
        (``flwr run``: ``scenario`` plus overrides, see
        :func:`fl_attack.config.from_run_config`).

    Returns
    -------
    ClientApp
        With a ``train`` handler, behind the scenario's ``[defense]`` mod.
    """
    client_app = ClientApp(mods=[defense_mod_for(scenario)])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        parsed = scenario
        if parsed is None:
            parsed = _scenario_for(tuple(sorted(context.run_config.items())))
        return train_handler(msg, context, parsed)

    return client_app


app = make_client_app()
