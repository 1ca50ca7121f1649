"""The registered inverters, imported explicitly so that registration is visible here."""

from __future__ import annotations

from fl_attack.engine.inverters.conv2d import Conv2dInverter
from fl_attack.engine.inverters.flatten import FlattenInverter
from fl_attack.engine.inverters.leaky_relu import LeakyReLUInverter
from fl_attack.engine.inverters.linear import LinearInverter
from fl_attack.engine.inverters.relu import ReLUInverter
from fl_attack.engine.inverters.sigmoid import SigmoidInverter
from fl_attack.engine.inverters.tanh import TanhInverter

__all__ = [
    "Conv2dInverter",
    "FlattenInverter",
    "LeakyReLUInverter",
    "LinearInverter",
    "ReLUInverter",
    "SigmoidInverter",
    "TanhInverter",
]
