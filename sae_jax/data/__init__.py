"""Activation stores (store.py) and the input pipeline that reads them (pipeline.py)."""
