"""Files on disk: our SAE folder (sae_folder.py), SAELens and Gemma Scope folders (saelens.py,
gemma_scope.py), the work directory's lock (lock.py)."""
