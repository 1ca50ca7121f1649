"""Client mods that transform the update (``update - global``) before the reply leaves.

Each mod has the shape ``mod(msg, ctxt, call_next) -> Message``: it remembers the global
arrays of the train message, lets the ClientApp train, and replaces the reply's arrays by
``global + transform(reply - global)``, keeping the keys. Preconditions that fail come
back as error Messages (``MOD_FAILED_PRECONDITION``), never as exceptions.

Why not Flower's own mods: ``LocalDpMod`` clips and adds noise calibrated by the classic
Gaussian mechanism from an (epsilon, delta) pair (valid only for epsilon < 1) with numpy's
global random state, so runs would not be reproducible and the noise could not be set by a
noise multiplier or relative to the update; ``fixedclipping_mod`` needs the clipping norm
sent by ``DifferentialPrivacyClientSideFixedClipping`` on the server and adds no noise.
:class:`ClipNoiseMod` does the same clipping (global L2 norm of the update) with seeded
noise and reports the (epsilon, delta) of its analytic calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fl_attack.config import DefenseConfig, DefenseKind
from fl_attack.defenses.transforms import (
    Update,
    clip_by_norm,
    gaussian_epsilon,
    gaussian_noise,
    laplace_noise,
    quantize,
    top_k,
)

__all__ = [
    "ClipNoiseMod",
    "NoiseMod",
    "QuantizeMod",
    "TopKMod",
    "UpdateMod",
    "defense_epsilon",
    "make_defense_mod",
    "noise_generator",
]

Mod = Callable[[Message, Context, ClientAppCallable], Message]


class UpdateMod:
    """Base of the update mods: the Message plumbing around one update transform.

    Parameters
    ----------
    seed : int
        With the round (``server-round`` of the train config) and the node's
        ``partition-id`` it seeds the mod's noise, so a run is reproducible.
    """

    name = "UpdateMod"

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{self.name}: seed must be an int >= 0, got {seed!r}")
        self.seed = seed

    def transform(self, update: Update, generator: torch.Generator) -> Update:
        """The defense proper: a new update from ``update`` (float64 tensors)."""
        raise NotImplementedError

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Train through ``call_next``, then send ``global + transform(update)``."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)  # only train replies carry an update
        if len(msg.content.array_records) != 1:
            return _error(msg, f"{self.name} expects one ArrayRecord in the train message")
        sent = next(iter(msg.content.array_records.values()))
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        if len(out.content.array_records) != 1:
            return _error(msg, f"{self.name} expects exactly one ArrayRecord in the reply")
        key, reply = next(iter(out.content.array_records.items()))
        if list(reply.keys()) != list(sent.keys()):
            return _error(
                msg,
                f"{self.name}: the reply's arrays ({', '.join(reply.keys())}) differ from the "
                f"global model's ({', '.join(sent.keys())}); the ClientApp must reply with "
                "the trained model's arrays",
            )
        before = {n: np.asarray(sent[n].numpy()) for n in sent}
        after = {n: np.asarray(reply[n].numpy()) for n in reply}
        update = {
            n: torch.from_numpy(after[n].astype(np.float64) - before[n].astype(np.float64))
            for n in before
        }
        new = self.transform(update, self._generator(msg, ctxt))
        out.content[key] = ArrayRecord(
            {
                n: Array((before[n].astype(np.float64) + new[n].numpy()).astype(after[n].dtype))
                for n in before
            }
        )
        return out

    def _generator(self, msg: Message, ctxt: Context) -> torch.Generator:
        """A generator seeded by (seed, round, partition): reproducible, distinct per client."""
        config = msg.content.config_records
        server_round = 0
        for record in config.values():
            server_round = int(record.get("server-round", server_round))
        partition = int(ctxt.node_config.get("partition-id", 0))
        return noise_generator(self.seed, server_round, partition)


class NoiseMod(UpdateMod):
    """Add i.i.d. Gaussian or Laplace noise to the update.

    Parameters
    ----------
    kind : {"gaussian", "laplace"}
        The noise distribution.
    scale : float
        Standard deviation (Gaussian) or scale ``b`` (Laplace), >= 0.
    relative : bool
        ``scale`` times the update's L2 norm instead.
    seed : int
        See :class:`UpdateMod`.
    """

    name = "NoiseMod"

    def __init__(self, kind: str, scale: float, *, relative: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if kind not in ("gaussian", "laplace"):
            raise ValueError(f"NoiseMod: kind must be gaussian or laplace, got {kind!r}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"NoiseMod: scale must be a finite float >= 0, got {scale!r}")
        self.kind, self.scale, self.relative = kind, float(scale), bool(relative)

    def transform(self, update: Update, generator: torch.Generator) -> Update:
        """The update plus noise."""
        noise = gaussian_noise if self.kind == "gaussian" else laplace_noise
        return noise(update, self.scale, relative=self.relative, generator=generator)


class ClipNoiseMod(UpdateMod):
    """Clip the update to a global L2 norm, then add Gaussian noise (DP-SGD style, per update).

    Parameters
    ----------
    clip_norm : float
        L2 bound ``C`` of the whole update, > 0.
    noise_multiplier : float
        Noise std over ``C``, >= 0.
    delta : float
        The delta of :attr:`epsilon`, in (0, 1).
    seed : int
        See :class:`UpdateMod`.

    Notes
    -----
    :attr:`epsilon` is that of one release (one client, one round) of the Gaussian
    mechanism with sensitivity ``C`` (Balle and Wang 2018); composition over rounds is
    not included.
    """

    name = "ClipNoiseMod"

    def __init__(
        self, clip_norm: float, noise_multiplier: float, *, delta: float = 1e-5, seed: int = 0
    ) -> None:
        super().__init__(seed=seed)
        if not math.isfinite(clip_norm) or clip_norm <= 0:
            raise ValueError(f"ClipNoiseMod: clip_norm must be > 0, got {clip_norm!r}")
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(
                f"ClipNoiseMod: noise_multiplier must be >= 0, got {noise_multiplier!r}"
            )
        if not 0 < delta < 1:
            raise ValueError(f"ClipNoiseMod: delta must be in (0, 1), got {delta!r}")
        self.clip_norm, self.noise_multiplier, self.delta = (
            float(clip_norm),
            float(noise_multiplier),
            float(delta),
        )

    @property
    def epsilon(self) -> float:
        """Epsilon of one release at :attr:`delta` (``inf`` without noise)."""
        return gaussian_epsilon(self.noise_multiplier, self.delta)

    def transform(self, update: Update, generator: torch.Generator) -> Update:
        """The clipped update plus N(0, (z C)^2) noise."""
        clipped = clip_by_norm(update, self.clip_norm)
        return gaussian_noise(clipped, self.noise_multiplier * self.clip_norm, generator=generator)


class TopKMod(UpdateMod):
    """Keep the largest ``fraction`` of each tensor's update entries (DLG's gradient pruning).

    Parameters
    ----------
    fraction : float
        In (0, 1].
    """

    name = "TopKMod"

    def __init__(self, fraction: float) -> None:
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"TopKMod: fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def transform(self, update: Update, generator: torch.Generator) -> Update:
        """The sparsified update."""
        return top_k(update, self.fraction)


class QuantizeMod(UpdateMod):
    """Round the update to fp16 or to per-tensor symmetric int8.

    Parameters
    ----------
    fmt : {"fp16", "int8"}
        The format.
    """

    name = "QuantizeMod"

    def __init__(self, fmt: str) -> None:
        super().__init__()
        if fmt not in ("fp16", "int8"):
            raise ValueError(f"QuantizeMod: fmt must be fp16 or int8, got {fmt!r}")
        self.fmt = fmt

    def transform(self, update: Update, generator: torch.Generator) -> Update:
        """The rounded update."""
        return quantize(update, self.fmt)


def noise_generator(seed: int, server_round: int, partition_id: int) -> torch.Generator:
    """The generator a mod draws a client's noise from in one round.

    Parameters
    ----------
    seed, server_round, partition_id : int
        The run's seed, the round (``server-round`` of the train config) and the node's
        ``partition-id``: reproducible runs, independent noise per client and round.

    Returns
    -------
    torch.Generator
        Freshly seeded.
    """
    state = np.random.SeedSequence([seed, server_round, partition_id]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def make_defense_mod(defense: DefenseConfig, *, seed: int = 0) -> UpdateMod | None:
    """The mod a ``[defense]`` table asks for, or ``None`` for ``kind = "none"``.

    Parameters
    ----------
    defense : DefenseConfig
        The parsed table.
    seed : int
        Seeds the noise (the run's seed).

    Returns
    -------
    UpdateMod or None
        Ready to go into ``ClientApp(mods=[...])``.
    """
    kind = defense.kind
    if kind is DefenseKind.NONE:
        return None
    if kind in (DefenseKind.GAUSSIAN, DefenseKind.LAPLACE):
        return NoiseMod(kind.value, defense.scale, relative=defense.relative, seed=seed)
    if kind is DefenseKind.CLIP_GAUSSIAN:
        assert defense.clip_norm is not None  # checked when the scenario was parsed
        return ClipNoiseMod(
            defense.clip_norm, defense.noise_multiplier, delta=defense.delta, seed=seed
        )
    if kind is DefenseKind.TOP_K:
        return TopKMod(defense.fraction)
    return QuantizeMod(defense.format)


def defense_epsilon(defense: DefenseConfig) -> tuple[float, float] | None:
    """The (epsilon, delta) per client and round of ``clip-gaussian``; ``None`` otherwise."""
    if defense.kind is not DefenseKind.CLIP_GAUSSIAN:
        return None
    return gaussian_epsilon(defense.noise_multiplier, defense.delta), defense.delta


def _error(msg: Message, reason: str) -> Message:
    """An error reply to ``msg`` (a failed precondition of a mod)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
