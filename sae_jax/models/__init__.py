"""The architectures: one module each, found here by their ``name``.

Adding an architecture is adding a module to this package whose ``SAE`` subclass sets a new
``name`` (and its tests); nothing else names it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from sae_jax.models.sae import SAE, abstract

NOT_ARCHITECTURES = ("activations", "init")


@functools.cache
def registry() -> dict[str, type[SAE]]:
    """Architecture name -> class, over every module of this package."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in NOT_ARCHITECTURES:
            importlib.import_module(f"{__name__}.{info.name}")
    found, todo = {}, [SAE]
    while todo:
        cls = todo.pop()
        if "name" in cls.__dict__:
            found.setdefault(cls.name, cls)
        todo.extend(cls.__subclasses__())
    return dict(sorted(found.items()))


def make_sae(model: Any, penalty: str, dead_tokens: int = 10_000_000) -> SAE:
    """The architecture named by ``model.architecture`` (a resolved ModelConfig), as an abstract module."""
    cls = registry()[model.architecture]
    hyper = dict(penalty=penalty, init_decoder_norm=model.init_decoder_norm, init_b_dec=model.init_b_dec,
                 apply_b_dec_to_input=model.apply_b_dec_to_input, dead_tokens=dead_tokens)
    names = cls.hyper_names()
    for field in ("k", "k_aux", "aux_coefficient"):
        if field in names:
            hyper[field] = getattr(model, field)
    for field, (name, *_) in cls.all_options().items():
        value = getattr(model, field)
        if value is not None:
            hyper[name] = value
    return abstract(cls, model.d_model, model.d_sae, **hyper)
