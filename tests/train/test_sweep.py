"""Sweeps: grid expansion and grouping, member == single run, the 4 x 2 sweep and its report,
a grid of jobs joined by the report, and the sweep axis split over (fake CPU) devices."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sae_jax import api, cli
from sae_jax import config as config_lib
from sae_jax.eval import report
from sae_jax.train import stacked
from sae_jax.train import sweep as sweep_lib
from sae_jax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model.d_sae=64", "train.batch_size=256", "optim.lr=3e-3", "train.progress=false",
          "train.eval_tokens=4096"]


def _overrides(store, workdir, *extra):
    return [f"data.store={store.path}", f"train.workdir={workdir}", *COMMON, *extra]


def _sweep_cfg(store, workdir, *extra):
    return config_lib.load_config(None, _overrides(store, workdir, *extra), resolve_recipe=False)


# --------------------------------------------------------------------------- the plan (no training)
def test_grid_expands_groups_and_names_members():
    cfg = config_lib.load_config(None, [
        "model.d_model=16", "train.workdir=w", "sweep.model.architecture=[relu,topk]", "sweep.model.k=[8,16]",
        "sweep.optim.lr=[1e-3,3e-4]",
    ], resolve_recipe=False)
    members = sweep_lib.expand(cfg)
    assert len(members) == 8 and members[0].name == "architecture-relu_k-8_lr-0.001"
    assert members[0].cfg.train.workdir == str(Path("w/members/architecture-relu_k-8_lr-0.001"))
    # Each member is resolved with its own architecture's recipe, and carries no sweep.
    assert {m.cfg.sparsity.penalty for m in members} == {"l1", "none"} and not members[0].cfg.sweep.grid
    groups = sweep_lib.group_members(members)
    # lr lives in TrainState.hparams: it stacks. k is static for topk, so topk splits by k; relu ignores k but
    # it is still part of the config, so relu splits too (same shape, separate compiled steps).
    assert [[m.point["optim.lr"] for m in g] for g in groups] == [[1e-3, 3e-4]] * 4
    assert [g[0].point["model.architecture"] for g in groups] == ["relu", "relu", "topk", "topk"]
    with pytest.raises(config_lib.ConfigError, match="sweep.group"):
        sweep_lib.select(groups, 4)


def test_grid_config_errors_name_the_key(tmp_path, capsys):
    yaml_cfg = tmp_path / "s.yaml"
    yaml_cfg.write_text("sweep:\n  grid:\n    sparsity.coefficient: [1e-4, 3e-4]\n    model: {k: [16, 32]}\n")
    cfg = config_lib.load_config(yaml_cfg, ["sweep.optim.lr=[1e-3]"], resolve_recipe=False)
    assert cfg.sweep.grid == {"sparsity.coefficient": [1e-4, 3e-4], "model.k": [16, 32], "optim.lr": [1e-3]}
    for bad, match in [("sweep.modle.k=[1]", "did you mean 'model.k'"), ("sweep.train.steps=[1,2]", "cannot be swept"),
                       ("sweep.model.k=16", "non-empty list"), ("sweep.model.k=[a]", "model.k")]:
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.load_config(None, [bad])
    (tmp_path / "plain.yaml").write_text("model:\n  d_sae: 64\n")
    assert cli.main(["sweep", str(tmp_path / "plain.yaml")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert "'sweep.grid' is empty" in err and "\n" not in err
    assert cli.main(["sweep", str(tmp_path / "plain.yaml"), "sweep.model.architecture=[relu,topk]",
                     "sparsity.penalty=l1"]) == cli.EXIT_USER_ERROR
    assert "sweep member 'architecture-topk'" in capsys.readouterr().err


def test_vmap_size_chooses_vmap_or_a_lax_map_loop(small_store, tmp_path):
    x = small_store.read(0, 256)
    for size, looped in [(2, False), (1, True), (0, True)]:  # 0 = auto: a loop on CPU
        cfg = _sweep_cfg(small_store, tmp_path, "sweep.sparsity.coefficient=[0.05,0.2]", f"sweep.vmap_size={size}")
        group = stacked.build_group(0, sweep_lib.expand(cfg), cfg.sweep)
        assert group.state.params["W_enc"].shape == (2, 32, 64)
        assert ("while" in group.step.lower(group.state, x).as_text()) == looped


# --------------------------------------------------------------------------- member == single run
@pytest.fixture(scope="module")
def pair(small_store, tmp_path_factory):
    """A 2-member sweep (two coefficients), vmapped and looped (lax.map), and the two single runs."""
    root = tmp_path_factory.mktemp("pair")
    extra = ("train.steps=100", "train.log_every=25")
    summaries = {}
    for name, vmap_size in [("sweep", 2), ("looped", 1)]:
        grid = ("sweep.sparsity.coefficient=[0.05,0.2]", f"sweep.vmap_size={vmap_size}")
        summaries[name] = sweep_lib.sweep(_sweep_cfg(small_store, root / name, *extra, *grid))
    singles = {}
    for name, coefficient in [("coefficient-0.05", 0.05), ("coefficient-0.2", 0.2)]:
        cfg = config_lib.load_config(None, _overrides(small_store, root / name, *extra,
                                                      f"sparsity.coefficient={coefficient}"))
        train(cfg)
        singles[name] = root / name
    return root / "sweep", summaries, singles


@pytest.mark.parametrize("kind", ["sweep", "looped"])
def test_two_member_sweep_equals_two_single_runs(pair, kind):
    sweep_dir, summaries, singles = pair
    sweep_dir, summaries = sweep_dir.parent / kind, summaries[kind]
    for name, single in singles.items():
        member = sweep_dir / "members" / name
        a, b = api.load(member), api.load(single)
        assert a.params.keys() == b.params.keys()
        for k in a.params:
            np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-5, atol=1e-5, err_msg=k)
        rows_a, rows_b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                          for d in (member, single))
        assert [r["step"] for r in rows_a] == [25, 50, 75, 100]
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert ra.keys() == rb.keys()
            for k in ra.keys() - {"tokens_per_s"}:
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=k)
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (member, single))
        assert sa == summaries[name]
        for k in ("fvu", "l0", "dead_fraction", "gamma", "mmcs", "steps", "train_tokens"):
            np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, err_msg=k)
        # The member's config.yaml is the single run's, but for the work directory.
        assert (member / "config.yaml").read_text() == (single / "config.yaml").read_text().replace(
            str(single), str(member))
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert plan["groups"] == [["coefficient-0.05", "coefficient-0.2"]]


def test_report_joins_sweeps_and_single_runs(pair, tmp_path, capsys):
    sweep_dir, _, singles = pair
    out = tmp_path / "joined"
    assert cli.main(["report", str(sweep_dir), *map(str, singles.values()), "--out", str(out)]) == 0
    rows = json.loads((out / report.JSON_FILE).read_text())
    assert sorted(r["name"] for r in rows) == sorted(["sweep/coefficient-0.05", "sweep/coefficient-0.2",
                                                      "coefficient-0.05", "coefficient-0.2"])
    assert (out / report.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pareto" in capsys.readouterr().out
    assert cli.main(["report", str(sweep_dir), str(sweep_dir / "members")]) == cli.EXIT_USER_ERROR
    assert "pass --out" in capsys.readouterr().err
    assert cli.main(["report", str(out)]) == cli.EXIT_USER_ERROR
    assert "no finished run" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4 coefficients x 2 architectures
def test_sweep_of_4_coefficients_by_2_architectures(small_store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  grid:\n    sparsity.coefficient: [0.02, 0.06, 0.2, 0.6]\n")
    workdir = tmp_path / "sweep"
    argv = ["sweep", str(config), *_overrides(small_store, workdir, "train.steps=200", "train.log_every=100"),
            "sweep.model.architecture=[relu,gated]"]
    assert cli.main(argv) == 0
    assert "trained 8 members" in capsys.readouterr().out
    with open(workdir / report.CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and (workdir / report.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((workdir / sweep_lib.PLAN_FILE).read_text())["groups"]) == 2
    assert any(r["pareto"] == "True" for r in rows)
    for arch in ("relu", "gated"):
        mine = sorted((float(r["coefficient"]), float(r["l0"]), float(r["fvu"])) for r in rows
                      if r["architecture"] == arch)
        assert [c for c, _, _ in mine] == [0.02, 0.06, 0.2, 0.6]
        l0 = [v for _, v, _ in mine]
        assert all(a > b for a, b in zip(l0, l0[1:], strict=False)), (arch, l0)
        assert all(0 < r[2] < 1 for r in mine)
    assert all(0 < float(r["mmcs"]) <= 1 for r in rows)


# --------------------------------------------------------------------------- a grid of jobs
def test_grid_of_jobs_one_group_each_then_the_report_joins_them(small_store, tmp_path):
    workdir = tmp_path / "grid"
    extra = ("train.steps=10", "train.log_every=5", "sweep.model.architecture=[relu,topk]")
    assert len(sweep_lib.sweep(_sweep_cfg(small_store, workdir, *extra, "sweep.group=1"))) == 1
    members = workdir / "members"
    assert sorted(p.name for p in members.iterdir()) == ["architecture-topk"]
    assert [r["architecture"] for r in report.collect([workdir])] == ["topk"]
    sweep_lib.sweep(_sweep_cfg(small_store, workdir, *extra, "sweep.group=0"))
    # The second job's report joins both groups.
    assert sorted(r["architecture"] for r in json.loads((workdir / report.JSON_FILE).read_text())) == ["relu", "topk"]


def test_two_process_sweep_with_members_on_different_processes(small_store, tmp_path):
    workdir = tmp_path / "mp"
    env = dict(os.environ, SAE_JAX_CMD="sweep", PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
    (tmp_path / "base.yaml").write_text("seed: 0\n")
    args = [str(ROOT / "launch" / "local.sh"), "2", str(tmp_path / "base.yaml"),
            *_overrides(small_store, workdir, "train.steps=20", "train.log_every=10",
                        "sweep.sparsity.coefficient=[0.05,0.2]", "sweep.shard=true")]
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[-3000:]
    rows = report.collect([workdir])
    assert [r["name"] for r in rows] == ["mp/coefficient-0.05", "mp/coefficient-0.2"]
    assert all(0 < r["fvu"] < 1 for r in rows) and rows[0]["l0"] > rows[1]["l0"]
    for r in rows:
        assert len((Path(r["workdir"]) / "metrics.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- members on different devices
SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from sae_jax import config as C, api
    from sae_jax.train import sweep as S
    from sae_jax.train import stacked
    store, root = sys.argv[1], sys.argv[2]
    params, specs = {}, {}
    for shard in ("false", "true"):
        cfg = C.load_config(None, [f"data.store={store}", f"train.workdir={root}/{shard}", "model.d_sae=64",
            "train.batch_size=256", "train.steps=20", "train.progress=false", "train.eval_tokens=2048",
            "mesh.data=2", "mesh.model=2", f"sweep.shard={shard}", "sweep.sparsity.coefficient=[0.05,0.2]"],
            resolve_recipe=False)
        group = stacked.build_group(0, S.expand(cfg), cfg.sweep)
        specs[shard] = [list(group.state.params[k].sharding.spec) for k in ("W_enc", "b_dec")]
        S.sweep(cfg)
        names = ("coefficient-0.05", "coefficient-0.2")
        params[shard] = {m: api.load(f"{root}/{shard}/members/{m}").params for m in names}
    a, b = params["true"], params["false"]
    diff = max(float(np.max(np.abs(a[m][k] - b[m][k]))) for m in a for k in a[m])
    print(json.dumps({"specs": specs, "diff": diff, "devices": jax.device_count()}))
""")


def test_sweep_axis_sharded_over_devices_matches_replicated(small_store, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(small_store.path), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    # W_enc [sweep, embed, latent]: latents on the model axis; members on the data axis only when sharded.
    assert result["specs"]["false"] == [[None, None, "model"], [None, None]]
    assert result["specs"]["true"] == [["data", None, "model"], ["data", None]]
    assert result["diff"] < 1e-5
