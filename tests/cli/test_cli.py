"""Command-line niceties: help, --print-config, --list-groups, the start banner, unit-less sizes, short reprs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sae_jax import cli
from sae_jax import config as config_lib
from sae_jax.models.matryoshka import MatryoshkaSAE
from sae_jax.models.sae import SAE
from sae_jax.train import aot, checkpoint
from tests.clitools import ROOT, cli_error


def test_bare_command_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-jax") and "train" in out and "sweep" in out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000000)" in out and "(default: float32)" in out


def test_device_memory_without_a_unit_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="has no unit; write it with one, e.g. 16GiB"):
        aot.parse_bytes("16")
    assert aot.parse_bytes("16GiB") == 16 * 2**30 and aot.parse_bytes("1000B") == 1000
    assert "has no unit" in cli_error("compile-check", ROOT / "configs/demo.yaml", "--device-memory", "16")


def test_train_print_config_is_the_resolved_config(capsys):
    assert cli.main(["train", str(ROOT / "configs/demo.yaml"), "--model.architecture", "topk", "--print-config"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["model"]["architecture"] == "topk" and doc["sparsity"]["penalty"] == "none"
    assert doc["model"]["k"] == 32 and doc["train"]["workdir"] == "runs/demo"


def test_sweep_print_config_and_list_groups(capsys):
    assert cli.main(["sweep", str(ROOT / "configs/sweep.yaml"), "--list-groups"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0", "1"] and "architecture-gated" in lines[1]
    assert cli.main(["sweep", str(ROOT / "configs/sweep.yaml"), "--print-config"]) == 0
    config, groups = yaml.safe_load_all(capsys.readouterr().out)
    assert config["sweep"]["grid"]["model.architecture"] == ["relu", "gated"]
    assert [g["architecture"] for g in groups["groups"]] == ["relu", "gated"]
    assert all(len(g["members"]) == 4 for g in groups["groups"])


def test_sweep_without_a_grid_says_to_add_one(small_store, tmp_path):
    error = cli_error("sweep", ROOT / "configs/demo.yaml", f"data.store={small_store.path}",
                      f"train.workdir={tmp_path / 'w'}")
    assert "'sweep.grid' is empty" in error and "sweep.KEY=[...]" in error


def test_train_prints_where_it_runs(small_store, tmp_path, capsys):
    args = ["train", str(ROOT / "configs/demo.yaml"), f"data.store={small_store.path}", "model.d_sae=64",
            f"train.workdir={tmp_path / 'run'}", "train.steps=4", "train.log_every=2", "train.eval_tokens=512",
            "train.progress=false"]
    assert cli.main(args) == 0
    head = capsys.readouterr().out.splitlines()[:2]
    assert head[0].startswith("sae-jax train: backend cpu, ") and "mesh data=1 x model=1" in head[0]
    assert f"relu: d_model 32, {2 * 32 * 64 + 64 + 32:,} parameters" in head[1] and str(tmp_path / "run") in head[1]
    # a sweep refuses the single run's work directory instead of resuming or --fresh-deleting it
    error = cli_error("sweep", ROOT / "configs/demo.yaml", f"data.store={small_store.path}",
                      f"train.workdir={tmp_path / 'run'}", "sweep.sparsity.coefficient=[0.1,0.2]")
    assert "holds a single run of `sae-jax train`" in error and "train.workdir=" in error
    from sae_jax import api

    text = repr(api.load(tmp_path / "run"))
    assert text.startswith("TrainedSAE(SAE(d_model=32, d_sae=64") and "W_enc[32, 64]" in text and len(text) < 300


def test_d_model_zero_means_from_the_store_on_resume():
    saved = config_lib.resolve(config_lib.with_d_model(config_lib.load_config(None, []), 64))
    meta = {"version": checkpoint.FORMAT_VERSION, "store": "s", "config": config_lib.to_dict(saved)}
    now = dataclasses.replace(saved, model=dataclasses.replace(saved.model, d_model=0))  # 0: the store's
    assert checkpoint.reconcile(meta, now, "s", 10)[1] == []
    with pytest.raises(config_lib.ConfigError, match="'model.d_model' changed from 64 to 32"):
        checkpoint.reconcile(meta, config_lib.with_d_model(now, 32), "s", 10)


def test_architecture_reprs_are_short():
    m = MatryoshkaSAE(d_model=8, d_sae=64, widths=(4, 8, 16, 32, 64))
    assert repr(m) == "MatryoshkaSAE(d_model=8, d_sae=64, penalty='l1', k=32, widths=(4, 8, ..., 64))"
    assert repr(SAE(d_model=8, d_sae=16)) == "SAE(d_model=8, d_sae=16, penalty='l1')"
