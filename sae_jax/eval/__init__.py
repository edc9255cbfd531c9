"""Judging SAEs: the metrics (metrics.py), held-out evaluation on a store (store.py), the language
model's loss with the SAE spliced in (lm.py) and the sweep report (report.py)."""
