"""A slimtune command that kills itself with SIGKILL at a chosen point: the subprocess of tests/test_faults.py.

Usage: ``FAULT_KILL=<event>:<n> python tests/fault_worker.py <slimtune CLI arguments>``. Without
``FAULT_KILL`` it is just the CLI. The kill is ``kill -9`` (no ``finally``, no ``atexit``, nothing flushed),
issued from inside the process at the n-th time ``event`` happens, so the point is exact and the test is
not a race against a timer. Events (each is a point a real kill can land on):

- ``shard``: a feature-store shard is complete (data file and manifest written);
- ``shard-data``: a shard's data file is in place, its manifest not written yet;
- ``torn-write``: a shard's data is in its temporary file, the rename not done yet;
- ``step``: the Trainer has taken a training step;
- ``checkpoint``: the Trainer has finished saving a checkpoint;
- ``checkpoint-partial``: the Trainer has saved a checkpoint's weights, not yet its optimizer state;
- ``selection``: the online trainer has logged a candidate batch;
- ``cell``: a bench cell's result has been written.
"""

from __future__ import annotations

import os
import signal
import sys
from unittest import mock

COUNTS: dict[str, int] = {}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def reached(event: str) -> None:
    """Count ``event``; kill the process if this is the occurrence FAULT_KILL names."""
    want, _, nth = os.environ.get("FAULT_KILL", "").partition(":")
    COUNTS[event] = COUNTS.get(event, 0) + 1
    if event == want and COUNTS[event] == int(nth):
        die()


def after(owner, attribute: str, event: str) -> None:
    original = getattr(owner, attribute)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        reached(event)
        return result

    setattr(owner, attribute, wrapped)


def before(owner, attribute: str, event: str) -> None:
    original = getattr(owner, attribute)

    def wrapped(*args, **kwargs):
        reached(event)
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def install_hooks() -> None:
    from transformers import Trainer

    from slimtune.bench import runner
    from slimtune.features import store
    from slimtune.online.trainer import SelectionMixin

    after(store.FeatureStore, "write", "shard")
    real_write_bytes, real_replace = store.atomic_write_bytes, os.replace

    def replace(source, destination):
        reached("torn-write")
        real_replace(source, destination)

    def write_bytes(path, data):
        with mock.patch("os.replace", replace):
            real_write_bytes(path, data)
        reached("shard-data")

    store.atomic_write_bytes = write_bytes
    after(Trainer, "training_step", "step")
    after(Trainer, "_save_checkpoint", "checkpoint")
    before(Trainer, "_save_optimizer_and_scheduler", "checkpoint-partial")
    after(SelectionMixin, "_write", "selection")
    real_json = runner.write_json

    def write_cell(path, obj):
        real_json(path, obj)
        if "cells" in os.fspath(path):
            reached("cell")

    runner.write_json = write_cell


def main(argv: list[str]) -> None:
    if os.environ.get("FAULT_KILL"):
        install_hooks()
    from slimtune.cli import app

    app(argv, prog_name="slimtune")


if __name__ == "__main__":
    main(sys.argv[1:])
