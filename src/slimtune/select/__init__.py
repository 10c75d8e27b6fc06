"""Offline selection: every method is a :class:`Selector`; :func:`get_selector` builds one by name."""

from __future__ import annotations

from typing import Any

from slimtune.select.base import Budget, Cost, Selection, Selector, UnscoredRowsError
from slimtune.utils import build_dataclass, load_registered

#: name -> "module:Class". Modules load lazily so a method's heavy imports cost nothing until it is used.
SELECTORS: dict[str, str] = {
    "random": "slimtune.select.heuristics:RandomSelector",
    "length": "slimtune.select.heuristics:LengthSelector",
    "oracle": "slimtune.select.heuristics:DomainOracleSelector",
    "loss": "slimtune.select.heuristics:LossSelector",
    "ifd": "slimtune.select.heuristics:IFDSelector",
    "kcenter": "slimtune.select.kcenter:KCenterSelector",
    "less": "slimtune.select.less:LessSelector",
    "delift": "slimtune.select.delift:DeliftSelector",
    "delift-se": "slimtune.select.delift:DeliftSESelector",
}


def selector_class(name: str) -> type[Selector]:
    """The method registered as ``name``, or a third-party :class:`Selector` dataclass named ``pkg.module:Class``."""
    return load_registered(SELECTORS, name, "selection method", base=Selector)


def get_selector(name: str, **params: Any) -> Selector:
    """Build the method ``name`` with ``params`` (its dataclass fields; a dict for a nested settings field, such
    as LESS's ``training``, changes the keys it names); unknown parameters are an error."""
    return build_dataclass(selector_class(name), params)


__all__ = ["SELECTORS", "Budget", "Cost", "Selection", "Selector", "UnscoredRowsError", "get_selector",
           "selector_class"]
