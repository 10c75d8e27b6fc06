"""``--config run.yaml`` for the CLI's commands: a YAML mapping of the command's own options.

Keys are the options' names, with dashes or underscores (``max-steps`` or ``max_steps``); values are what the
flag takes. A repeatable ``key=value`` option (``param``, ``training-arg``) takes a list of ``key=value``
strings or a mapping. The file's values become the command's defaults (click's ``default_map``, which typer
keeps), so a flag given on the command line overrides the file. An unknown key or a value of the wrong type
stops the command (exit 2) with the file and the key named. Paths in the file read as they would on the
command line (from the working folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml


def _as_pairs(value: Any) -> Any:
    """A mapping for a repeatable key=value option as the ``key=value`` strings the flag takes."""
    if not isinstance(value, dict):
        return value
    return [f"{key}={item if isinstance(item, str) else json.dumps(item)}" for key, item in value.items()]


def apply_config(ctx: typer.Context, param: typer.CallbackParam, path: Path | None) -> Path | None:
    """The ``--config`` callback (eager, so it runs before the other options are read)."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise typer.BadParameter(f"{path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of option names to values, found a "
                                 f"{type(data).__name__}")
    options = {p.name: p for p in ctx.command.params if p.name and p.name != param.name}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        option = options.get(name)
        if option is None:
            known = ", ".join(sorted(n.replace("_", "-") for n in options))
            raise typer.BadParameter(f"{path}: unknown key '{key}' for `{ctx.command_path}`; known: {known}")
        if option.multiple:
            value = _as_pairs(value)
            value = value if isinstance(value, list) else [value]
        try:
            option.process_value(ctx, value)  # the conversion the flag's own value goes through
        except typer.BadParameter as err:
            raise typer.BadParameter(f"{path}: key '{key}': {err.message}") from None
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", is_eager=True, callback=apply_config, metavar="YAML",
    help="YAML file of this command's options (keys as the flags, dashes or underscores); flags given on the "
         "command line override it.")]
