"""`sae-jax eval-lm`: CE loss and KL with each SAE spliced into the language model

For every SAE under WORKDIR (a run, or each sweep member), on held-out contexts: ce_clean, ce_sae,
delta_loss, zero- and mean-ablation baselines, ce_loss_score and KL scores, beside a PCA baseline with as
many components as the SAE's mean L0. Model, corpus and hook default to the training store's harvest
metadata. See sae_jax/eval_lm.py.
"""

from __future__ import annotations

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = common.command(subparsers, "eval-lm", run, __doc__)
    p.add_argument("workdir", help="work directory of `sae-jax train` or `sae-jax sweep`")
    p.add_argument("--model", help="model spec as for harvest (default: the store's)")
    p.add_argument("--corpus", help="corpus as for harvest (default: the store's; contexts after the harvested ones "
                   "are held out)")
    p.add_argument("--hook", help="hook to splice (default: the SAE's training site)")
    p.add_argument("--data", help="the SAEs' training store (default: data.store of the run's config.yaml)")
    p.add_argument("--contexts", type=int, default=32, help="held-out contexts to score")
    p.add_argument("--context", type=int, help="tokens per context (default: the harvest's)")
    p.add_argument("--batch-size", type=int, default=4, help="contexts per forward")
    p.add_argument("--json", help="also write the metrics to this JSON file")


def run(args) -> int:
    from sae_jax.eval import lm as eval_lm

    results = eval_lm.evaluate_lm(args.workdir, model=args.model, corpus=args.corpus, hook=args.hook,
                                  data=args.data, contexts=args.contexts, context=args.context,
                                  batch_size=args.batch_size)
    print(eval_lm.table(results))
    if args.json:
        common.write_json(args.json, results)
    return 0
