"""compile-check for multi-host meshes: per-process input bytes, collective bytes per step read from the
compiled HLO (sae_jax.train.collectives), the rates a step time needs, and the optimizer memory that
bfloat16 moments save. The fake-device compiles run in a subprocess (aot._report_in_subprocess)."""

from __future__ import annotations

import json

import pytest

from sae_jax import cli
from sae_jax.train import collectives

D, M, B = 32, 2048, 256
CONFIG = f"model: {{architecture: relu, d_model: {D}, d_sae: {M}}}\ntrain: {{batch_size: {B}}}\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cc") / "c.yaml"
    path.write_text(CONFIG)
    return path


def report(config, tmp_path, *argv) -> tuple[dict, int]:
    out = tmp_path / "r.json"
    status = cli.main(["compile-check", str(config), *argv, "--json", str(out)])
    return json.loads(out.read_text()), status


def test_the_batch_moves_to_the_latents_and_only_the_data_axis_crosses_hosts(config, tmp_path, capsys):
    """2×4 over 2 processes (one data row each): the batch is all-gathered over 'model' inside each process,
    and the gradients are all-reduced over 'data', between the processes."""
    r, status = report(config, tmp_path, "--mesh", "2x4", "--processes", "2", "--step-time", "0.5")
    assert status == 0
    assert r["processes"] == 2 and r["input_per_process"] == B // 2 * D * 4
    gather = r["collectives"]["all-gather"]
    # each device receives 3/4 of its data row's B/2 × d batch (float32), once per step
    assert gather["bytes"] == pytest.approx(B // 2 * D * 4 * 3 / 4) and gather["cross_process_bytes"] == 0
    reduce = r["collectives"]["all-reduce"]
    # W_enc and W_dec gradients (d × m/4 each per device), all-reduced over the 2 data devices: 2·S·(1/2) each
    assert reduce["cross_process_bytes"] >= 2 * D * (M // 4) * 4
    assert r["collective_bytes"] == pytest.approx(sum(k["bytes"] for k in r["collectives"].values()))
    printed = capsys.readouterr().out
    assert "input 16.00 KiB per step" in printed and "between processes" in printed
    assert "each process reads 32.00 KiB/s" in printed


def test_a_latent_axis_over_both_hosts_gathers_the_batch_between_them(config, tmp_path):
    r, _ = report(config, tmp_path, "--mesh", "1x8", "--processes", "2")
    gather = r["collectives"]["all-gather"]
    assert gather["bytes"] == pytest.approx(B * D * 4 * 7 / 8) == gather["cross_process_bytes"]
    one, _ = report(config, tmp_path, "--mesh", "1x8", "--processes", "1")
    assert one["cross_process_bytes"] == 0 and one["collective_bytes"] == pytest.approx(r["collective_bytes"])


def test_bfloat16_moments_halve_the_optimizer_state(config, tmp_path):
    f32, _ = report(config, tmp_path, "--mesh", "1x8")
    bf16, _ = report(config, tmp_path, "--mesh", "1x8", "optim.moment_dtype=bfloat16")
    assert bf16["params"] == f32["params"]
    assert bf16["optimizer"] - 4 == (f32["optimizer"] - 4) // 2  # the int32 step count stays


@pytest.mark.parametrize("argv, words", [
    (["--processes", "3"], "--processes 3 must be a positive divisor of the mesh's 8 devices"),
    (["--processes", "0"], "--processes 0 must be a positive divisor"),
    (["--step-time", "0"], "--step-time 0.0 must be a positive number of seconds"),
])
def test_bad_arguments_get_one_sentence(config, capsys, argv, words):
    assert cli.main(["compile-check", str(config), "--mesh", "2x4", *argv]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_replica_groups_in_every_text_form():
    assert collectives._groups("x replica_groups={{0,1},{2,3}}, dimensions={0}", 4) == [[0, 1], [2, 3]]
    assert collectives._groups("x replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]
    assert collectives._groups("x replica_groups=[2,4]<=[8], dimensions={1}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert collectives._groups("x replica_groups=[4,2]<=[2,4]T(1,0), d", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = "x replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, use_global_device_ids=true"
    assert collectives._groups(mesh, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = "x replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, u"
    assert collectives._groups(mesh, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert collectives._groups("x source_target_pairs={{0,1},{4,5}}, m", 8) == [[0, 1], [4, 5]]


def test_while_bodies_count_their_trip_count_and_async_starts_their_result():
    hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%add
}

ENTRY %main (a: f32[8]) -> f32[32] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ags = (f32[8]{0}, f32[32]{0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %agd = f32[32]{0} all-gather-done(%ags)
}
"""
    found = {c.kind: c for c in collectives.parse(hlo, 4, processes=2)}
    assert found["all-reduce"].count == 5 and found["all-reduce"].bytes_per_device == 2 * 32 * 3 / 4
    assert found["all-gather"].count == 1 and found["all-gather"].bytes_per_device == 128 * 3 / 4
    assert found["all-gather"].crosses_processes and len(found) == 2
