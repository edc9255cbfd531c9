"""Files on disk: the work directory's file names and the one atomic write (layout.py), our SAE folder
(sae_folder.py), SAELens and Gemma Scope folders (saelens.py, gemma_scope.py), loading an SAE from any
of them (loader.py) and the work directory's lock (lock.py)."""
