"""Online selection: every method is a :class:`Policy`; :func:`get_policy` builds one by name."""

from __future__ import annotations

from typing import Any

from slimtune.online.base import CandidateBatch, Policy
from slimtune.utils import load_registered

#: name -> "module:Class", loaded lazily.
POLICIES: dict[str, str] = {
    "uniform": "slimtune.online.policies.baselines:UniformPolicy",
    "big-loss": "slimtune.online.policies.baselines:BigLossPolicy",
    "grad-norm": "slimtune.online.policies.baselines:GradNormPolicy",
    "rho-loss": "slimtune.online.policies.baselines:RhoLossPolicy",
    "loss-minus-init": "slimtune.online.policies.baselines:LossMinusInitPolicy",
    "infobatch": "slimtune.online.policies.infobatch:InfoBatchPolicy",
    "uds": "slimtune.online.policies.uds:UDSPolicy",
    "slap": "slimtune.online.policies.slap:SLAPPolicy",
}


def policy_class(name: str) -> type[Policy]:
    """The method registered as ``name``, or a third-party :class:`Policy` dataclass named ``pkg.module:Class``."""
    return load_registered(POLICIES, name, "online method", base=Policy)


def get_policy(name: str, **params: Any) -> Policy:
    return policy_class(name)(**params)


__all__ = ["POLICIES", "CandidateBatch", "Policy", "get_policy", "policy_class"]
