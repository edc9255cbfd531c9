"""`sae-jax eval`: evaluate a trained SAE on a store (FVU, L0, dead/dense, gamma, MMCS)"""

from __future__ import annotations

from pathlib import Path

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "eval", run, __doc__)
    p.add_argument("workdir", help="work directory of a trained SAE (or its sae/ folder)")
    p.add_argument("--data", required=True, help="activation store to evaluate on (every token)")
    p.add_argument("--ground-truth", help="true dictionary [F, d] .npy (default: the store's ground_truth.npy if it "
                   "has one, checked against its digest)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per evaluation batch")
    p.add_argument("--nonfinite", default="error", choices=["error", "skip"], help="rows with NaN or Inf: 'error' "
                   "stops, 'skip' leaves them out (as training's data.nonfinite)")
    p.add_argument("--json", help="also write the metrics to this JSON file")


def run(args) -> int:
    from sae_jax.data import pipeline
    from sae_jax.data import store as store_lib
    from sae_jax.eval.store import evaluate
    from sae_jax.io import loader

    model = loader.load(args.workdir)
    store = store_lib.open_store(args.data)
    store.check_d_model(model.sae.d_model, field="the SAE's d_model")
    if args.ground_truth:
        gt_path, gt = Path(args.ground_truth), ground_truth_file(Path(args.ground_truth), model.sae.d_model)
    else:  # the store's own, checked against its digest
        gt_path, gt = store.path / store_lib.GROUND_TRUTH_FILE, store.ground_truth()
    batches = pipeline.iter_eval(store, batch_size=args.batch_size, split="all", max_tokens=args.max_tokens,
                                 nonfinite=args.nonfinite, fix="pass --nonfinite skip")
    result = evaluate(model, batches, gt)
    if gt is not None:
        result["ground_truth"] = str(gt_path)
    common.print_result(result, f"evaluation of {args.workdir} on {args.data}")
    if args.nonfinite == "skip":
        covered = store.n_tokens if args.max_tokens is None else min(store.n_tokens, args.max_tokens)
        result["skipped_rows"] = covered - result["tokens"]
        print(f"skipped {result['skipped_rows']} row(s) holding NaN or Inf (--nonfinite skip)")
    if args.json:
        common.write_json(args.json, result)
    return 0


def ground_truth_file(path: Path, d_model: int):
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
