"""Checkpoints of a training run: restore_or_init at start, save in the loop (when due), preemption.

The only module that imports orbax. A checkpoint (one orbax step directory) holds three items:

- ``state``: the TrainState (step, params, opt_state, stats, hparams) as sharded arrays (any
  pytree of arrays: a sweep saves ``{group: stacked TrainState}``);
- ``digest``: a position-weighted checksum per leaf of the state (orbax's array files carry no
  checksum, so a flipped byte would otherwise restore silently);
- ``meta``: one JSON file per process with that process's data-iterator (grain) state, the
  resolved config, the normalization scalar, the store identity and a SHA-256 of itself.

Saves are asynchronous (``CheckpointManager`` with async checkpointing; ``save`` returns after
the arrays are handed over, the write and the commit-by-rename happen in a background thread).
A save's error surfaces at the next save or ``wait``, so every save first waits for the one
before it: a failure is always attributed to the right step and the last good step is known.

Resume (maxtext / levanter ``load_checkpoint_or_initialize`` pattern): the newest step whose
meta, arrays and digests all check out wins; an unreadable one is reported, moved aside to
``<dir>.corrupt/`` and the previous one is tried. The saved config is compared with the new
one: changes that would corrupt the run are refused naming the key; safe ones are reported.

Preemption: a single process installs its own SIGTERM/SIGINT handler (a flag read after each
step). With ``jax.distributed`` initialized, JAX's C++ SIGTERM notifier and the coordination
service's preemption sync point decide the step, so that every host saves the same one
(``multihost_utils.reached_preemption_sync_point``); SIGINT is forwarded to it as SIGTERM.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from sae_jax import config as config_lib
from sae_jax.io import layout
from sae_jax.sharding import is_main

FORMAT_VERSION = 2
"""2: the Flax NNX models (no TrainState.rng). 1 (older) is refused with what to do."""
CHECKPOINT_DIR = layout.CHECKPOINTS
EXIT_PREEMPTED = 143
"""Exit status of a run stopped by SIGTERM/SIGINT after its checkpoint was saved (128 + SIGTERM)."""

ITEMS = ("state", "digest", "meta")

# Config keys a resumed run may change (reported); every other change is refused.
SAFE_KEYS = ("train.steps", "train.log_every", "train.progress", "train.eval_tokens", "train.workdir", "checkpoint.",
             "mesh.", "distributed.", "data.store", "sweep.shard", "sweep.vmap_size")
# Keys added after checkpoints were first written: the value a checkpoint without the key trained with.
ADDED_KEYS = {"train.compute_dtype": "float32", "optim.moment_dtype": "float32"}
# Keys whose default is derived from train.steps: when only train.steps changed they keep the saved value.
STEP_DERIVED = ("optim.warmup_steps", "sparsity.warmup_steps")
# Keys a resume sets itself (an extended schedule's re-warm): a later resume keeps the saved value.
RESUME_SET = {"optim.rewarm_step": 0, "optim.rewarm_from": 0.0}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the last good step."""


class Preempted(Exception):  # noqa: N818 - an event, not an error
    """The run stopped on SIGTERM/SIGINT after saving a checkpoint at ``step``."""

    def __init__(self, step: int, directory: Path, where: str = ""):
        text = (f"preempted: saved a checkpoint at step {step} in {directory}; run the same command again to resume."
                if not where else
                f"preempted {where}: the checkpoint of the last step ({step}) is saved in {directory}; run the same "
                "command again to write the run's remaining outputs (sae/ and summary.json).")
        super().__init__(text)
        self.step, self.directory = step, directory


class AllCheckpointsUnusable(config_lib.ConfigError):
    """Every checkpoint of a run is unusable: refused unless the run starts over (--fresh)."""


class CorruptCheckpoint(Exception):  # noqa: N818 - internal signal, always reported
    """A checkpoint step that cannot be used (unreadable file, digest mismatch)."""


# --------------------------------------------------------------------------- digests
def _mix(w: jax.Array) -> jax.Array:
    """A bijection of uint32: xorshift then an odd multiply (the first half of MurmurHash3's fmix32)."""
    return (w ^ (w >> 16)) * np.uint32(0x85EBCA6B)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words, keeping its shape (plus a last axis for 8-byte types)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 checksum of an array's bits: sum_i mix(w_i) * (2i + 1) mod 2^32.

    w_i is the i-th uint32 word in row-major order (i from iotas, so a sharded array is never
    gathered). Changing any one word changes the sum: ``_mix`` is a bijection and 2i + 1 is odd,
    hence invertible mod 2^32. Integer sums are exact and order-free, so the digest is the same on
    any mesh; ``_mix`` makes it nonlinear, so structured multi-word damage does not cancel as it
    can in a linear checksum (a random corruption passes with probability 2^-32). One fused pass:
    about a memory read of the array.
    """
    w = _words(jnp.asarray(x))
    if w.ndim == 0:
        w = w[None]
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2**32)
        stride *= w.shape[axis]
    terms = _mix(w) * (2 * pos + 1)
    if terms.ndim > 1:  # rows first: XLA on CPU runs this much faster than one flat reduction
        terms = jnp.sum(terms, axis=-1, dtype=jnp.uint32)
    return jnp.sum(terms, dtype=jnp.uint32)


def _tree_digest(tree: Any) -> Any:
    return jax.tree.map(leaf_digest, tree)


@functools.lru_cache(maxsize=8)
def _jitted_digest(replicated: jax.sharding.Sharding | None):
    return jax.jit(_tree_digest, out_shardings=replicated)


def tree_digest(tree: Any, replicated: jax.sharding.Sharding | None = None) -> Any:
    """``leaf_digest`` of every leaf, jitted once; the results are replicated (every process holds them)."""
    return _jitted_digest(replicated)(tree)


def _digest_mismatches(saved: Any, restored: Any) -> list[str]:
    """Paths of the leaves whose restored digest differs from the saved one."""
    saved, restored = jax.device_get((saved, restored))
    flat_saved = jax.tree_util.tree_flatten_with_path(saved)[0]
    return [jax.tree_util.keystr(path) for (path, a), b in zip(flat_saved, jax.tree.leaves(restored), strict=True)
            if not np.array_equal(a, b)]


# --------------------------------------------------------------------------- per-process JSON item
def _json_digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Each process writes its own ``process_I-of-N.json`` (as grain's orbax handler does) with a SHA-256."""

    def save(self, directory: epath.Path, args: ProcessJsonSave):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        body = {"payload": args.item, "sha256": _json_digest(args.item)}
        (directory / name).write_text(json.dumps(body, indent=1))

    def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> dict:
        """This process's dict; with ``args.of_process_0``, process 0's, whatever number of processes wrote it."""
        if args is not None and args.of_process_0:
            path = next(iter(sorted(directory.glob("process_0-of-*.json"))), directory / "process_0-of-1.json")
        else:
            path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir())
            raise ProcessCountMismatch(f"{path} does not exist (the checkpoint has {', '.join(saved)})",
                                       len([n for n in saved if n.startswith("process_")]))
        body = json.loads(path.read_text())
        if _json_digest(body["payload"]) != body.get("sha256"):
            raise CorruptCheckpoint(f"{path} does not match its SHA-256")
        return body["payload"]

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self):
        pass


class ProcessCountMismatch(Exception):  # noqa: N818 - handled by restore_or_init
    """The checkpoint was written by another number of processes (``saved``)."""

    def __init__(self, message: str, saved: int):
        super().__init__(message)
        self.saved = saved


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    """Save a JSON-able dict, one file per process."""

    item: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    """Restore this process's JSON dict (process 0's with ``of_process_0``)."""

    item: dict | None = None
    of_process_0: bool = False


# --------------------------------------------------------------------------- the manager
def checkpoint_dir(cfg: config_lib.Config) -> Path:
    """Where a run's checkpoints live: ``checkpoint.dir``, or ``WORKDIR/checkpoints``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.workdir) / CHECKPOINT_DIR


def say(message: str) -> None:
    """A one-line note on stderr from process 0."""
    if is_main():
        print(f"checkpoint: {message}", file=sys.stderr, flush=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _all_agree(ok: bool) -> bool:
    """True on every process iff ``ok`` is true on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def _reason(e: BaseException) -> str:
    """The root cause of an exception in a few words (ENOSPC is spelled out)."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ENOSPC or "No space left" in str(c):
            return "no space left on device"
    text = " ".join(str(chain[-1]).split())
    return f"{type(chain[-1]).__name__}: {text[:300]}"


class Checkpoints:
    """The run's CheckpointManager: asynchronous saves every ``every`` steps, the last ``keep`` kept."""

    def __init__(self, directory: Path, every: int, keep: int, replicated: jax.sharding.Sharding | None = None,
                 fresh: bool = False):
        self.directory = Path(directory).absolute()
        for place in (self.directory, *self.directory.parents):  # a file on the way fails only at the first save
            if place.exists() and not place.is_dir():
                raise config_lib.ConfigError(f"the checkpoint directory '{directory}' is (or lies under) the file "
                                             f"'{place}'; set config key 'checkpoint.dir' to a directory.")
            if place.exists():
                break
        self.every = every
        self.replicated = replicated or jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)), jax.sharding.PartitionSpec())
        if fresh:
            self._clear()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), cleanup_tmp_directories=True,
            enable_async_checkpointing=True, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "digest": ocp.StandardCheckpointHandler(),
                    "meta": ProcessJsonHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                             item_handlers=handlers)
        self.last_good: int | None = self.manager.latest_step()
        self._pending: int | None = None
        self._failed = False

    def _clear(self) -> None:
        if is_main():  # the directory's contents, not itself: it may be a mount point; quarantined steps stay
            for path in self.directory.glob("*"):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        _barrier("sae_jax_checkpoint_fresh")

    @property
    def quarantine_dir(self) -> Path:
        """Where unreadable steps are moved (outside orbax's directory, so it never sees them)."""
        return self.directory.with_name(self.directory.name + layout.CORRUPT_SUFFIX)

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    # -------------------------------------------------------------- saving
    def due(self, step: int, total: int) -> bool:
        """Whether the loop saves at ``step``: every ``every`` steps and at the last step."""
        return step == total or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Start an asynchronous save of ``state`` at ``step`` (no-op if that step is saved already).

        Waits for the previous save first, so its error (if any) is raised here, as CheckpointError.
        """
        self.wait()
        if step == self.last_good:
            return False
        digest = tree_digest(state, self.replicated)
        body = dict(meta, version=FORMAT_VERSION, step=step, process_count=jax.process_count())
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), digest=ocp.args.StandardSave(digest),
                                  meta=ProcessJsonSave(body))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            self._fail(step, e)
        self._pending = step
        return True

    def wait(self) -> None:
        """Block until the pending save has committed; CheckpointError if it failed."""
        if self._pending is None or self._failed:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)
        self.last_good = step

    def _fail(self, step: int, e: BaseException):
        self._failed = True
        last = f"step {self.last_good}" if self.last_good is not None else "none"
        raise CheckpointError(f"could not save the checkpoint of step {step} in {self.directory} ({_reason(e)}); the "
                              f"run stops here and its last good checkpoint is {last} (free space or set "
                              "checkpoint.dir, then run again to resume).") from e

    def close(self) -> None:
        """Wait for the pending save (errors already raised are not raised again) and release the manager."""
        try:
            if not self._failed:
                self.wait()
        finally:
            if not self._failed:
                self.manager.close()

    # -------------------------------------------------------------- restoring
    def read_meta(self, step: int, of_process_0: bool = False) -> dict:
        """This process's meta item of a step (process 0's with ``of_process_0``); CorruptCheckpoint if
        unreadable, ProcessCountMismatch if another number of processes wrote it."""
        try:
            args = ocp.args.Composite(meta=ProcessJsonRestore(of_process_0=of_process_0))
            return self.manager.restore(step, args=args).meta
        except (ProcessCountMismatch, CorruptCheckpoint):
            raise
        except Exception as e:  # noqa: BLE001 - unreadable is unreadable, whatever the library says
            raise CorruptCheckpoint(f"its meta item is unreadable ({_reason(e)})") from e

    def read_state(self, step: int, abstract_state: Any) -> Any:
        """The state of a step, laid out as ``abstract_state`` says and checked against its digests."""
        abstract_digest = jax.eval_shape(_tree_digest, abstract_state)
        abstract_digest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated),
                                       abstract_digest)
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), digest=ocp.args.StandardRestore(abstract_digest)))
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"its arrays are unreadable ({_reason(e)})") from e
        bad = _digest_mismatches(got.digest, tree_digest(got.state, self.replicated))
        if bad:
            raise CorruptCheckpoint(f"{', '.join(bad)} do(es) not match the saved digest")
        return got.state

    def quarantine(self, step: int, why: str) -> None:
        """Report an unusable step and move it aside, so the run can save that step again."""
        say(f"step {step} in {self.directory} is unusable: {why}; moved it to {self.quarantine_dir}, trying the "
            "previous checkpoint.")
        if is_main():
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            target = self.quarantine_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(self.directory / str(step)), target)
        _barrier(f"sae_jax_quarantine_{step}")
        self.manager.reload()
        self.last_good = self.manager.latest_step()


# --------------------------------------------------------------------------- restore_or_init
@dataclass
class Restored:
    """What a run starts from: a restored checkpoint or a fresh state."""

    state: Any
    step: int = 0
    """Steps already taken (0 for a fresh start)."""
    data_state: dict | None = None
    """This process's data-iterator state; None for a fresh start, or when the checkpoint was written by
    another number of processes (``saved_processes``): the data stream then starts again."""
    config: Any = None
    """The config to run with (the new one, with step-derived fields kept from the checkpoint), or what
    ``restore_or_init``'s ``check`` returned."""
    changes: list[str] = field(default_factory=list)
    """Accepted config changes, as 'key: old -> new'."""

    saved_processes: int = 0
    """The number of processes that wrote the checkpoint, when it differs from this job's (else 0)."""

    @property
    def resumed(self) -> bool:
        """Whether a checkpoint was restored."""
        return self.step > 0


def restore_or_init(ckpts: Checkpoints, init: Callable[[], Any], abstract_state: Any, cfg: config_lib.Config,
                    store_identity: str, check: Callable[..., tuple[Any, list[str]]] | None = None) -> Restored:
    """The newest good checkpoint, checked against ``cfg``, or ``init()`` if there is none.

    ``abstract_state`` carries the target shardings (of the current mesh), so a checkpoint written
    on one mesh restores onto another, and by another number of processes: the train state is the
    same, but each process's place in its share of the data cannot carry over to a new partition of
    the rows, so the data stream starts again (``Restored.saved_processes``). Unusable steps are
    reported and moved aside; a refused config change raises ConfigError naming the key.
    ``check(meta, cfg, store_identity, step)`` replaces ``reconcile`` (e.g. a sweep also checks each member's config).
    """
    check = check or reconcile
    quarantined = []
    for step in ckpts.steps():
        saved_processes = 0
        try:
            try:
                meta = ckpts.read_meta(step)
            except ProcessCountMismatch as e:
                meta, saved_processes = dict(ckpts.read_meta(step, of_process_0=True), data=None), e.saved
            new_cfg, changes = check(meta, cfg, store_identity, step)
            state = ckpts.read_state(step, abstract_state)
            ok, why = True, ""
        except (CorruptCheckpoint, ProcessCountMismatch) as e:
            ok, why = False, str(e)
        if _all_agree(ok):
            return Restored(state, step, meta["data"], new_cfg, changes, saved_processes)
        ckpts.quarantine(step, why or "another process could not read it")
        quarantined.append(step)
    if quarantined:
        raise AllCheckpointsUnusable(
            f"every checkpoint in {ckpts.directory} is unusable (step(s) {', '.join(map(str, quarantined))}, moved to "
            f"{ckpts.quarantine_dir}); the run will not silently start over from step 0: pass --fresh to start over, "
            "or restore a good checkpoint into that directory and run again.")
    return Restored(init(), config=cfg)


# --------------------------------------------------------------------------- config changes on resume
def _derived_warmup(steps: int) -> int:
    return max(1, int(config_lib.WARMUP_FRACTION * steps))


def reconcile(meta: dict, cfg: config_lib.Config, store_identity: str, step: int
              ) -> tuple[config_lib.Config, list[str]]:
    """The config to resume with, and the accepted changes; ConfigError naming a refused key.

    Safe changes (``SAFE_KEYS``: total steps, logging and checkpoint cadence, mesh, paths) are
    accepted. A warmup length that equals the default derived from the new ``train.steps`` keeps its
    saved value (so extending a run does not change its schedule). Any other change (architecture,
    widths, seed, batch size, optimizer, data order, store identity) would make the resumed run a
    different run, so it is refused.
    """
    if meta.get("version") == 1:
        raise config_lib.ConfigError(
            f"the checkpoint of step {step} in {checkpoint_dir(cfg)} has checkpoint format 1 (sae_jax before its Flax "
            f"models), and this version reads format {FORMAT_VERSION}; finish that run with the sae_jax version that "
            "started it, or pass --fresh to start over (deleting its checkpoints).")
    if meta.get("version") != FORMAT_VERSION:
        raise CorruptCheckpoint(f"its format version is {meta.get('version')}, expected {FORMAT_VERSION}")
    if meta.get("store") != store_identity:
        raise config_lib.ConfigError(
            f"config key 'data.store' ({cfg.data.store}) is store {store_identity}, but the checkpoint of step {step} "
            f"was trained on store {meta.get('store')}; resume with the same store, or pass --fresh to start over.")
    saved, now = config_lib.flatten(meta["config"]), config_lib.flatten(config_lib.to_dict(cfg))
    kept, changes = {}, []
    for key, new in now.items():
        old = saved.get(key, ADDED_KEYS.get(key, new))
        if old == new or (key == "model.d_model" and 0 in (old, new)):  # 0: from the store, checked above
            continue
        if key in STEP_DERIVED and new == _derived_warmup(now["train.steps"]):
            kept[key] = old
            changes.append(f"{key}: kept {old} (derived from the original train.steps)")
        elif key in RESUME_SET and new == RESUME_SET[key]:
            kept[key] = old
        elif any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS):
            changes.append(f"{key}: {old!r} -> {new!r}")
        else:
            raise config_lib.ConfigError(
                f"config key '{key}' changed from {old!r} to {new!r} since the checkpoint of step {step}; a resumed "
                "run cannot change it: restore the old value, set train.workdir to a new directory for a separate "
                "run, or pass --fresh to start over (deleting these checkpoints).")
    if cfg.train.steps < step:
        raise config_lib.ConfigError(f"config key 'train.steps' ({cfg.train.steps}) is below the checkpoint's step "
                                     f"{step}; raise it, or pass --fresh to start over.")
    for key, value in kept.items():
        section, name = key.split(".")
        cfg = _replace_field(cfg, section, name, value)
    if now["train.steps"] != saved.get("train.steps", now["train.steps"]):
        cfg, note = _rewarm(config_lib.from_dict(meta["config"]), cfg, step)
        changes += [note] if note else []
    return cfg, changes


def _rewarm(old: config_lib.Config, cfg: config_lib.Config, step: int) -> tuple[config_lib.Config, str]:
    """An extended (or shortened) run whose learning-rate factor at ``step`` would jump re-warms instead.

    The old schedule's factor f_old at the resume step is kept as the start of a linear re-warm
    to the new schedule over optim.warmup_steps (``train.step.schedule``), so the learning rate is
    continuous; the note says so. No change where the factor is the same (e.g. a constant schedule).
    """
    from sae_jax.train import step as step_lib

    if old.optim.warmup_steps is None or cfg.optim.warmup_steps is None:  # a sweep's own, unresolved config:
        return cfg, ""  # each member's resolved config re-warms in its own reconcile
    f_old = float(step_lib.schedule(old.optim, old.train.steps)(step))
    f_new = float(step_lib.schedule(cfg.optim, cfg.train.steps)(step))
    if abs(f_new - f_old) <= 1e-6:
        return cfg, ""
    cfg = _replace_field(_replace_field(cfg, "optim", "rewarm_step", step), "optim", "rewarm_from", f_old)
    lr = cfg.optim.lr or 0.0
    return cfg, (f"train.steps: the learning rate at step {step} would jump from {f_old * lr:.3g} to {f_new * lr:.3g} "
                 f"under the new schedule; it re-warms linearly from {f_old * lr:.3g} over {cfg.optim.warmup_steps} "
                 f"steps instead (optim.rewarm_step={step}, optim.rewarm_from={f_old:.6g})")


def _replace_field(cfg: config_lib.Config, section: str, name: str, value: Any) -> config_lib.Config:
    from dataclasses import replace

    return replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})


# --------------------------------------------------------------------------- preemption
class PreemptionWatch:
    """Tells the loop, after each step, whether to save and stop.

    Single process: our own SIGTERM/SIGINT handler sets a flag (the first signal asks for a
    checkpoint; the handler then steps aside, so a second signal acts as usual). With
    jax.distributed initialized: JAX's C++ SIGTERM notifier plus the coordination service's sync
    point (every host gets True at the same step); SIGINT is re-sent to ourselves as SIGTERM. A
    Python SIGTERM handler is not installed then, since it would replace JAX's.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.multihost = jax.distributed.is_initialized()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._install()

    def _install(self) -> None:
        signals = (signal.SIGINT,) if self.multihost else self.SIGNALS
        for sig in signals:
            if signal.getsignal(sig) == signal.SIG_IGN:  # e.g. nohup, or a background job: stay ignored
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self._previous.pop(signum, None)
        if self.multihost:  # hand SIGINT to JAX's preemption notifier
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.signal_name = self.signal_name or name
        say(f"received {name}: saving a checkpoint after this step, then exiting (status {EXIT_PREEMPTED}).")

    def reached(self, step: int) -> bool:
        """Whether to save at ``step`` and stop; call once after every step, on every host."""
        if self.multihost:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal_name is not None

    def stop_if_signalled(self, step: int, directory: Path, where: str) -> None:
        """After the loop (the final outputs): raise Preempted if a signal came (single process).

        With jax.distributed the coordination service's sync point is per step and the loop is over,
        so the outputs are finished instead.
        """
        if not self.multihost and self.signal_name is not None:
            raise Preempted(step, directory, where)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- inspection
def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def read_host(directory: str | Path, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpoint's state as host arrays keyed by path ('params/W_enc', 'opt_state/0/mu/W_enc', ...)
    and process 0's meta item. For inspection and tests: it needs neither the writer's mesh nor devices."""
    directory = epath.Path(directory)
    if step is None:
        step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(directory / str(step) / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(restore_args=restore_args))
    arrays = {_path_name(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(state)[0]}
    meta_file = next((directory / str(step) / "meta").glob("process_0-of-*.json"))
    return arrays, json.loads(meta_file.read_text())["payload"]
