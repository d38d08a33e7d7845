"""What every brain3d command shares: where the configs are, a check of the command line before Hydra runs,
``--help``, and one line with exit status 2 for a user's mistake.

Hydra answers a misspelt key with advice to add it (``+trainer.max_epoch=3``, which then does nothing), an
unknown option with a multi-line listing, and a missing mandatory value with a traceback, all with exit
status 1. :func:`run_command` composes the config with the command line first (the first value of each
sweep) and turns those into one line that names the nearest valid key or option, exit status 2; anything it
does not recognise is left to Hydra.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

EXIT_USER_ERROR = 2  # README "Exit codes": a mistake in the command, the config or the data

log = logging.getLogger("brain3d")


def config_dir() -> str:
    """configs/ ships inside the installed package as brain3d/configs; in a source checkout it is ../configs."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"brain3d configs not found next to {here}")


def report_user_error(command: str, err: BaseException | str) -> None:
    """The message on stderr, and the same in the run's log file, not a second time on the console (Hydra's
    console log handler would repeat it). A config error is one line; a data report one line per problem."""
    message = str(err).rstrip()
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def group_options(group: str) -> list[str]:
    """The options of a config group: the .yaml files of configs/<group>/."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def _config_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        full = f"{prefix}.{key}" if prefix else str(key)
        keys.append(full)
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            keys.extend(_config_keys(value, full))
    return keys


def _single_value_overrides(args: list[str]) -> list[str] | None:
    """The command line's overrides with each sweep (``a,b``, ``range(...)``) replaced by its first value, so
    one composition checks them; hydra.* overrides are left out (Hydra checks its own). None when the
    overrides do not parse (Hydra then reports the syntax error itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:
        return None
    single = []
    for override in parsed:
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            if not values:
                continue
            single.append(f"{override.get_key_element()}={values[0]}")
        else:
            single.append(override.input_line)
    return single


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _unknown_key_message(key: str, config_name: str, others: list[str]) -> str:
    try:
        known = _config_keys(_compose(config_name, others))
    except Exception:
        known = []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{key} is not a config key{hint} (`--help` lists the config groups; `--cfg job` prints every key)"


def _unknown_option_message(err) -> str:
    missing = getattr(err, "missing_cfg_file", "") or ""
    group, _, option = str(missing).rpartition("/")
    options = list(getattr(err, "options", None) or group_options(group))
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{group}={option} is not an option of {group}; choose one of {', '.join(options)}{hint}"


def check_command_line(config_name: str, args: list[str], required: dict[str, str] | None = None,
                       validate: Callable[[DictConfig], str | None] | None = None) -> str | None:
    """Compose ``config_name`` with ``args`` as Hydra will; return one line saying what is wrong, or None.

    ``required``: mandatory keys (``???`` in the config) -> how to give them, e.g. ``{"checkpoint": "..."}``.
    ``validate``: the command's own check of the composed config (a message, or None), run before Hydra
    creates a run folder.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None  # --cfg, --info, --config-dir ...: Hydra's own options
    overrides = _single_value_overrides(args)
    if overrides is None:
        return None
    try:
        cfg = _compose(config_name, overrides)
    except MissingConfigException as err:
        return _unknown_option_message(err)
    except ConfigCompositionException as err:
        text = f"{err} {err.__cause__ or ''}"
        match = re.search(r"Could not override '([^']+)'", text)
        if match and "not in struct" in text:
            key = match.group(1)
            # the valid keys under the command line's group choices (task=..., data=...), not its other values
            # (the misspelt key itself is left out: a top-level key has no dot either)
            groups = [o for o in overrides if "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))
                      and o.split("=", 1)[0] != key]
            return _unknown_key_message(key, config_name, groups)
        return " ".join(str(err).split())
    except Exception:
        return None  # anything else: Hydra reports it as it always has
    missing = [key for key in (required or {}) if OmegaConf.is_missing(cfg, key)]
    if missing:
        return "; ".join(f"missing {key}: {required[key]}" for key in missing)
    return validate(cfg) if validate is not None else None


def run_command(hydra_main: Callable[[], object], command: str, config_name: str, help_text: str,
                required: dict[str, str] | None = None,
                validate: Callable[[DictConfig], str | None] | None = None) -> None:
    """The console entry point of a command: ``--help``, the command-line check, then Hydra's main."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        try:
            print(help_text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left; no traceback for that
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    problem = check_command_line(config_name, args, required, validate)
    if problem:
        report_user_error(command, problem)
        sys.exit(EXIT_USER_ERROR)
    hydra_main()


def _group_defaults(root: Path, config_name: str) -> dict:
    """``{group: default option}`` from a config's defaults list, following configs it extends (``- train``)."""
    defaults = {}
    for entry in OmegaConf.load(root / f"{config_name}.yaml").get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and (root / f"{entry}.yaml").is_file():
            defaults.update(_group_defaults(root, entry))
        elif isinstance(entry, (dict, DictConfig)):
            defaults.update({str(key): value for key, value in entry.items()})
    return defaults


def groups_help(config_name: str = "train", groups: tuple[str, ...] | None = None) -> str:
    """``  task        classification (default) | regression | segmentation`` per config group."""
    root = Path(config_dir())
    defaults = _group_defaults(root, config_name)
    names = groups or tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra"
                                   and not p.name.startswith("_")))
    lines = []
    for group in names:
        options = group_options(group)
        if not options:
            continue
        chosen = defaults.get(group)
        shown = [f"{o} (default)" if o == chosen else o for o in options]
        lines.append(f"  {group:<15}{' | '.join(shown)}")
    return "\n".join(lines)


def keys_help(config_name: str) -> str:
    """The top-level keys of configs/<config_name>.yaml with their comments, as written there."""
    lines = []
    for line in (Path(config_dir()) / f"{config_name}.yaml").read_text().splitlines():
        if re.match(r"^[a-z_]+: *[^ #]", line) and not line.startswith(("defaults:", "hydra:")):
            lines.append("  " + line)
        elif line.startswith(" " * 20) and lines and "#" in line and not line.strip().startswith("-"):
            lines.append("  " + line)  # a comment continued on the next line
    return "\n".join(lines)


def progress_mode(value) -> str:
    """``trainer.progress`` (and predict's ``progress``) -> ``"bars"``, ``"lines"`` or ``"off"``.

    auto (default): tqdm bars when stderr is a terminal, else plain log lines every
    ``trainer.progress_interval_s`` (a SLURM log or ``> file`` would fill with a bar's escape codes);
    true / bars: always bars; lines: always lines; false / off: neither (the per-epoch line stays).
    """
    text = str(value).lower()
    if text == "auto":
        return "bars" if sys.stderr.isatty() else "lines"
    if text in ("true", "bars", "1"):
        return "bars"
    if text == "lines":
        return "lines"
    if text in ("false", "off", "none", "0"):
        return "off"
    from brain3d.errors import ConfigError

    raise ConfigError(f"progress={value!r} is not one of auto, true (bars), lines, false")
