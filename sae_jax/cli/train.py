"""`sae-jax train`: train an SAE from a YAML config plus dotted overrides

Train an SAE. Overrides look like model.d_sae=4096 optim.lr=3e-4 (or --model.d_sae 4096). Every key is
documented in sae_jax/config.py.
"""

from __future__ import annotations

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    flags = parents.run_flags(
        fresh="start over: delete the work directory's checkpoints (by default a run resumes from its newest good "
              "checkpoint)",
        print_config="print the resolved config (recipe defaults filled in) as YAML and exit without training")
    common.command(subparsers, "train", run, __doc__,
                   parents=[flags, parents.config("YAML config file, e.g. configs/demo.yaml")])


def run(args) -> int:
    from sae_jax import config as config_lib

    cfg = config_lib.load_config(args.config, args.overrides)
    from sae_jax.train.loop import train  # after the config: a bad one is refused without importing jax

    if args.print_config:
        print(common.config_yaml(with_store_d_model(cfg)), end="")
        return 0
    common.start_banner("train", cfg, [cfg])
    summary = train(cfg, fresh=args.fresh)
    from sae_jax.sharding import is_main

    if is_main():  # one table per job, not one per process
        common.print_result(summary, f"held-out evaluation ({cfg.train.workdir})")
    return 0


def with_store_d_model(cfg):
    """The config with model.d_model taken from its store, where the store can be opened (else as it is)."""
    from sae_jax import config as config_lib
    from sae_jax.data import store as store_lib

    if cfg.model.d_model or not cfg.data.store:
        return cfg
    try:
        return config_lib.with_d_model(cfg, store_lib.open_store(cfg.data.store).d_model)
    except Exception:  # noqa: BLE001 - a missing store is reported by the run itself, not by --print-config
        return cfg
