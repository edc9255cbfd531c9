"""Hugging Face (torch) adapter: TransformerLens hook names over torch forward hooks.

An optional extra: importing this module needs ``torch``; :func:`hf_folder_source` also
needs ``transformers``. A hook map sends each hook kind to a module-name template and to
that module's ``"input"`` or ``"output"``; a forward that has captured every requested
hook stops there, so asking for layer 3 of 30 runs four layers. Activations and logits
come back as float32 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_jax.lm.source import Source, SpliceFn, hook_name, sha256_files

HookMap = Mapping[str, tuple[str, str]]
"""``{hook kind: (module-name template with {l}, "input" | "output")}``."""

LLAMA_HOOKS: HookMap = {
    "hook_resid_pre": ("model.layers.{l}", "input"),
    "hook_attn_out": ("model.layers.{l}.self_attn", "output"),
    "hook_mlp_out": ("model.layers.{l}.mlp", "output"),
    "hook_resid_post": ("model.layers.{l}", "output"),
}
BERT_HOOKS: HookMap = {
    "hook_resid_pre": ("encoder.layer.{l}", "input"),
    "hook_attn_out": ("encoder.layer.{l}.attention.output.dense", "output"),
    "hook_mlp_out": ("encoder.layer.{l}.output.dense", "output"),
    "hook_resid_post": ("encoder.layer.{l}", "output"),
}
HOOK_MAPS: dict[str, HookMap] = {"llama": LLAMA_HOOKS, "bert": BERT_HOOKS}


class _Stop(Exception):
    """Raised by a hook once every requested activation is captured."""


class HFTokenizer:
    """A ``transformers`` tokenizer behind the Tokenizer protocol (no special tokens added)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return self.tokenizer.decode(list(ids))


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


def _to_torch(x: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


class _Hooks:
    """Forward hooks that record and/or splice named activations for one call."""

    def __init__(self, modules: Mapping[str, tuple[torch.nn.Module, str]]):
        self.modules = modules
        self.captured: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def install(self, record: Sequence[str], splice: Mapping[str, SpliceFn], stop: bool):
        """Hook every recorded or spliced name; ``stop`` ends the forward when all are recorded."""
        self.n_record, self.stop = len(record), stop and bool(record)
        for name in {*record, *splice}:
            module, where = self.modules[name]
            fn = self._hook(name, name in record, splice.get(name))
            if where == "input":
                self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(fn))

    def _hook(self, name: str, record: bool, splice: SpliceFn | None):
        def apply(value: torch.Tensor) -> torch.Tensor:
            if record:
                self.captured[name] = value.detach().float().cpu().numpy()
            if self.stop and len(self.captured) == self.n_record:
                raise _Stop
            if splice is None:
                return value
            return _to_torch(splice(value.detach().float().cpu().numpy()), value)

        def pre_hook(module, args, kwargs):
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        def post_hook(module, args, output):
            return _replace_first(output, apply(_first(output)))

        return pre_hook if self.modules[name][1] == "input" else post_hook

    def remove(self) -> None:
        """Detach every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def hf_source(
    model: torch.nn.Module,
    hook_map: HookMap | None = None,
    *,
    name: str | None = None,
    tokenizer: Any = None,
    **fields: Any,
) -> Source:
    """A :class:`~sae_jax.lm.source.Source` over a torch ``transformers`` model.

    ``hook_map`` defaults to the map for ``model.config.model_type``. ``tokenizer`` may be a
    ``transformers`` tokenizer (its special ids fill the defaults) or None. Splice
    functions receive and return numpy arrays. Logits exist when the model returns them.
    """
    config = model.config
    hook_map = hook_map or HOOK_MAPS[config.model_type]
    named = dict(model.named_modules())
    modules = {}
    for layer in range(config.num_hidden_layers):
        for kind, (template, where) in hook_map.items():
            module_name = template.format(l=layer)
            if module_name not in named:
                raise KeyError(f"{type(model).__name__} has no module {module_name!r}")
            modules[hook_name(layer, kind)] = (named[module_name], where)
    model.eval()

    def call(tokens: Any, record: Sequence[str], splice: Mapping[str, SpliceFn], stop: bool):
        hooks = _Hooks(modules)
        hooks.install(record, splice, stop)
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        try:
            with torch.inference_mode():
                out = model(input_ids=ids)
        except _Stop:
            out = None
        finally:
            hooks.remove()
        return out, hooks.captured

    def activations(tokens: Any, wanted: Sequence[str]) -> dict[str, np.ndarray]:
        return call(tokens, wanted, {}, stop=True)[1]

    def logits(tokens: Any, splice: Mapping[str, SpliceFn]) -> np.ndarray:
        return call(tokens, (), splice, stop=False)[0].logits.float().numpy()

    has_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    defaults = _tokenizer_fields(tokenizer) if tokenizer is not None else {}
    return Source(
        name=name or getattr(config, "name_or_path", "") or type(model).__name__,
        d_model=int(config.hidden_size),
        hooks=tuple(modules),
        activations_fn=activations,
        logits_fn=logits if has_head else None,
        **{**defaults, **fields},
    )


def _tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """Source fields from a ``transformers`` tokenizer (BERT's CLS/SEP stand in for BOS/EOS)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return {
        "tokenizer": HFTokenizer(tokenizer),
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": tokenizer.pad_token_id,
        "special_ids": frozenset(tokenizer.all_special_ids),
    }


def hf_folder_source(folder: str | Path, hook_map: HookMap | None = None, **fields: Any) -> Source:
    """Load a local ``transformers`` folder (never the network) as a float32 torch source.

    A causal-LM head is loaded when the config names one; hashes cover the weight files
    and ``tokenizer.json``.
    """
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or ())
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    tok_files = [p for p in (folder / "tokenizer.json", folder / "vocab.txt") if p.is_file()]
    return hf_source(
        model,
        hook_map,
        name=fields.pop("name", folder.name),
        tokenizer=tokenizer,
        weights_hash=sha256_files(weights),
        tokenizer_hash=sha256_files(tok_files) if tok_files else "",
        **fields,
    )
