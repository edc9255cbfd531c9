"""configs/scale/: each record-size preset loads, its mesh splits its batch and dictionary, and the state
its header promises per device is what the shapes and shardings give (compile-check's exact lines; the
full compiles of 64-512 fake devices are in the README's table, too slow for the suite)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sae_jax import config as config_lib
from sae_jax import sharding

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "scale").glob("*.yaml"))
GIB = 2**30


def header(path: Path, key: str) -> str:
    match = re.search(rf"^# {key}:\s*(.+)$", path.read_text(), re.M)
    assert match, f"{path.name} has no '{key}:' header line"
    return match[1]


def test_there_are_the_three_record_presets():
    assert [p.name for p in PRESETS] == ["jumprelu_1m_d5376.yaml", "topk_16m_d4096.yaml", "topk_34m_d4096.yaml"]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_preset_loads_and_its_header_states_the_exact_state_per_device(path):
    cfg = config_lib.load_config(path)
    d, m, c = cfg.model.d_model, cfg.model.d_sae, cfg.mesh
    sharding.check_divisible(sharding.mesh_shape(c.data, c.model), cfg.train.batch_size, m)
    command = header(path, "Command")
    assert f"sae-jax compile-check configs/scale/{path.name}" in command and "--device-memory 16GiB" in command
    processes = int(re.search(r"--processes (\d+)", command)[1])
    hardware = header(path, "Hardware")
    assert f"{c.data * c.model} devices of 16 GiB" in hardware and f"{processes} processes" in hardware
    # W_enc and W_dec split over the model axis; Adam's two moments in optim.moment_dtype.
    params = 2 * d * m * 4 / c.model
    moments = 2 * 2 * d * m * (2 if cfg.optim.moment_dtype == "bfloat16" else 4) / c.model
    state = re.search(r"parameters ([\d.]+) GiB, (\w+) Adam moments ([\d.]+) GiB", path.read_text())
    assert state, f"{path.name} states no exact state"
    assert float(state[1]) == pytest.approx(params / GIB, abs=0.006)
    assert state[2] == cfg.optim.moment_dtype and float(state[3]) == pytest.approx(moments / GIB, abs=0.006)
    peak = float(re.search(r"peak ([\d.]+) GiB", path.read_text())[1])
    assert peak < 16  # what compile-check measured fits the hardware named
