"""Online selection: every method is a :class:`Policy`; :func:`get_policy` builds one by name."""

from __future__ import annotations

import importlib
from typing import Any

from slimtune.online.base import CandidateBatch, Policy

#: name -> "module:Class", loaded lazily.
POLICIES: dict[str, str] = {
    "uniform": "slimtune.online.policies.baselines:UniformPolicy",
    "big-loss": "slimtune.online.policies.baselines:BigLossPolicy",
    "grad-norm": "slimtune.online.policies.baselines:GradNormPolicy",
    "rho-loss": "slimtune.online.policies.baselines:RhoLossPolicy",
    "infobatch": "slimtune.online.policies.infobatch:InfoBatchPolicy",
    "uds": "slimtune.online.policies.uds:UDSPolicy",
    "slap": "slimtune.online.policies.slap:SLAPPolicy",
}


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise ValueError(f"unknown online method '{name}'; known: {', '.join(sorted(POLICIES))}")
    module, cls = POLICIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_policy(name: str, **params: Any) -> Policy:
    return policy_class(name)(**params)


__all__ = ["POLICIES", "CandidateBatch", "Policy", "get_policy", "policy_class"]
