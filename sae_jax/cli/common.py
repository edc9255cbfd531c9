"""What the commands share: the parent parsers (config + overrides, --fresh/--print-config, the restart
flags of a store writer), the help formatter that shows defaults, the start banner and printing helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is None/False or the help already names one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(default, bool)):
            return text
        return f"{text} (default: {default})"


class MainFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    pass


def command(subparsers, name: str, run, doc: str | None = None, parents=(), **kw) -> argparse.ArgumentParser:
    """A (sub)command's parser, showing defaults in its help; ``run(args) -> int`` runs it.

    ``doc``, the command module's docstring, gives the one-line help (its first paragraph, after
    "`sae-jax NAME`: ") and the description (the rest, if any)."""
    if doc is not None:
        summary, _, body = doc.partition("\n\n")
        kw |= {"help": " ".join(summary.split()).split(": ", 1)[1], "description": " ".join(body.split()) or None}
    p = subparsers.add_parser(name, parents=list(parents), formatter_class=DefaultsFormatter, **kw)
    p.set_defaults(fn=run)
    return p


# --------------------------------------------------------------------------- parent parsers
class AfterConfig(argparse.Action):
    """The overrides (everything after the config file), less this command's own options given among them
    (``train CONFIG --fresh``, ``compile-check CONFIG --mesh 2x4``): those are applied as if given before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        rest, values = [], list(values)
        while values:
            text = values.pop(0)
            name, eq, value = text.partition("=")
            action = parser._option_string_actions.get(name)
            if action is None or action.dest == "help":
                rest.append(text)  # an override
            elif action.nargs == 0 and not eq:
                action(parser, namespace, None, name)
            elif action.nargs != 0 and (eq or values):
                action(parser, namespace, _typed(parser, action, value if eq else values.pop(0)), name)
            else:
                rest.append(text)  # --fresh=1, or --mesh without a value: the config loader refuses it
        setattr(namespace, self.dest, rest)


def _typed(parser, action, text: str):
    """``text`` converted by the option's ``type`` (argparse's own conversion and error message)."""
    try:
        return parser._get_values(action, [text]) if action.nargs is None else text
    except argparse.ArgumentError as e:
        parser.error(str(e))


class Parents:
    """The parent parsers (argparse ``parents=``) that commands build theirs from."""

    def __init__(self):
        self.restart = argparse.ArgumentParser(add_help=False)
        g = self.restart.add_mutually_exclusive_group()
        g.add_argument("--resume", action="store_true", help="continue an interrupted write (OUT.partial) after its "
                       "last whole shard; it needs the same settings and inputs")
        g.add_argument("--overwrite", action="store_true", help="start over: delete OUT.partial, and replace a store "
                       "at OUT once the new one is finalized")

    @staticmethod
    def run_flags(fresh: str, print_config: str) -> argparse.ArgumentParser:
        """--fresh (start over instead of resuming) and --print-config (print the config and exit), with
        each command's own help."""
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--fresh", action="store_true", help=fresh)
        p.add_argument("--print-config", action="store_true", help=print_config)
        return p

    @staticmethod
    def config(config: str, overrides: str = "dotted key=value overrides") -> argparse.ArgumentParser:
        """The YAML config file and the dotted overrides after it (where the command's options may stand too)."""
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("config", help=config)
        p.add_argument("overrides", nargs=argparse.REMAINDER, action=AfterConfig, help=overrides)
        return p


# --------------------------------------------------------------------------- printing
def config_yaml(cfg) -> str:
    """A config (any of sae_jax.config's dataclasses) as YAML."""
    import yaml

    from sae_jax import config as config_lib

    return yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False)


def print_result(result: dict, title: str) -> None:
    from sae_jax.eval.store import table

    print(table(result, title))


def write_json(path: str, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def start_banner(command: str, cfg, members: list, extra: str = "") -> None:
    """Process 0 says where the run goes: backend, devices, mesh, parameters and work directory.

    Informational only: anything it cannot work out (e.g. a missing store) is left to the run, which
    reports it in its own words."""
    import jax

    from sae_jax import sharding

    d = cfg.distributed
    sharding.init_distributed(d.coordinator, d.num_processes, d.process_id)  # before any backend is touched
    if jax.process_index() != 0:
        return
    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
        d_model, counts = _parameter_counts(cfg, members)
    except Exception:  # noqa: BLE001 - the run itself reports what is wrong
        return
    devices = jax.devices()
    kinds = sorted({getattr(dev, "device_kind", dev.platform) for dev in devices})
    params = f"{min(counts):,}" if len(counts) == 1 else f"{min(counts):,}-{max(counts):,}"
    print(f"sae-jax {command}: backend {jax.default_backend()}, {len(devices)} device(s) ({', '.join(kinds)}) in "
          f"{jax.process_count()} process(es); mesh data={mesh.shape['data']} x model={mesh.shape['model']}\n"
          f"  {members[0].model.architecture if len(members) == 1 else 'each member'}: d_model {d_model}, "
          f"{params} parameters{'; ' + extra if extra else ''}; work directory {cfg.train.workdir}", flush=True)


def _parameter_counts(cfg, members: list) -> tuple[int, set[int]]:
    """(d_model, the set of the members' parameter counts), d_model taken from the store."""
    import numpy as np

    from sae_jax.data import store as store_lib
    from sae_jax.models import make_sae

    d_model = store_lib.open_store(cfg.data.store).d_model if cfg.data.store else 0
    counts = set()
    for m in members:
        model = dataclasses.replace(m.model, d_model=d_model)  # the config's d_model may be 0: from the store
        params, _ = make_sae(model, m.sparsity.penalty, m.train.dead_tokens).split()
        counts.add(sum(int(np.prod(a.shape)) for a in params.values()))
    return d_model, counts
