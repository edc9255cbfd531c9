"""The activation store: zarr3 arrays [n_tokens, d_model] on tensorstore, plus one metadata file.

Layout of a finalized store directory::

    STORE/metadata.json        written last; format version, shape, dtype, source, norm scalar,
                               a sha256 per shard of every site, a sha256 per extra file
    STORE/<site>/zarr.json     one zarr3 array per site (hook or layer), all in the same token order
    STORE/<site>/c/<k>/0       shard k: rows [k*rows_per_shard, (k+1)*rows_per_shard), made of
                               chunks of rows_per_chunk rows (sharding_indexed codec)
    STORE/<name>.npy           optional extra files (e.g. ground_truth.npy)

Durability: a writer fills ``STORE.partial`` and records its progress there after every whole
shard; ``finalize`` writes ``metadata.json`` and renames the directory into place, so a crashed
writer leaves nothing that opens as a store, and ``create_store(..., resume=True)`` continues
after the last whole shard (``overwrite=True`` starts over instead). Every chunk and shard index
carries a crc32c (checked on every read) and ``fill_missing_data_reads`` is off, so a missing
shard is an error and never reads as zeros.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from sae_jax.io.layout import (
    GROUND_TRUTH,
    PARTIAL_SUFFIX,
    REPLACED_SUFFIX,
    STORE_FORMAT,
    STORE_METADATA,
    STORE_PROGRESS,
    atomic_write,
    fsync,
)

log = logging.getLogger(__name__)

FORMAT = STORE_FORMAT
FORMAT_VERSION = 1
METADATA_FILE = STORE_METADATA
PROGRESS_FILE = STORE_PROGRESS
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
INPUT_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64))
DTYPE_ALIASES = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32"}
DEFAULT_ROWS_PER_CHUNK = 128  # one chunk = one random block of the loader: small enough to mix well
SHARD_TARGET_BYTES = 64 << 20  # whole shards are buffered by the writer: keep them modest
MAX_CHUNKS_PER_SHARD = 256
NORM_SAMPLE_ROWS = 65536
READ_CACHE_BYTES = 8 << 20  # enough to keep shard indices cached between block reads
GROUND_TRUTH_FILE = GROUND_TRUTH
START_OVER = "start over with --overwrite (--fresh for harvest; overwrite=True in Python)"


class StoreError(Exception):
    """A store is missing, unfinalized, damaged or does not fit: the message names the file and the fix."""


# --------------------------------------------------------------------------- helpers


def canonical_dtype(dtype: str, where: str = "dtype") -> str:
    """'float32' or 'bfloat16' (aliases bf16, f32, fp32 accepted); StoreError otherwise."""
    name = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise StoreError(f"{where}: unsupported dtype '{dtype}'; a store holds float32 or bfloat16.")
    return name


def _write_json(path: Path, obj: dict) -> None:
    """Write JSON durably and atomically (``layout.atomic_write``)."""
    atomic_write(path, json.dumps(obj, indent=1))


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: cannot read it as JSON ({e}); the store is damaged, re-create it.") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: expected a JSON object; the store is damaged, re-create it.")
    return obj


def _digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes in storage dtype and C order."""
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _default_rows_per_shard(rows_per_chunk: int, d_model: int, dtype: str) -> int:
    chunk_bytes = rows_per_chunk * d_model * DTYPES[dtype].itemsize
    chunks = max(1, min(MAX_CHUNKS_PER_SHARD, SHARD_TARGET_BYTES // chunk_bytes))
    return rows_per_chunk * 2 ** int(math.log2(chunks))


def shard_file(site: str, shard: int) -> str:
    """Path of a shard inside the store directory (zarr3 default chunk key encoding)."""
    return f"{site}/c/{shard}/0"


def _array_spec(path: Path, layout: dict) -> dict:
    """The zarr3 spec of one site: sharded, crc32c on every chunk and on every shard index."""
    raw = {"name": "bytes", "configuration": {"endian": "little"}}
    sharding = {"name": "sharding_indexed", "configuration": {
        "chunk_shape": [layout["rows_per_chunk"], layout["d_model"]],
        "codecs": [raw, {"name": "crc32c"}],
        "index_codecs": [raw, {"name": "crc32c"}],
        "index_location": "end",
    }}
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [0, layout["d_model"]],
            "data_type": layout["dtype"],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout["rows_per_shard"],
                                                                               layout["d_model"]]}},
            "codecs": [sharding],
            "fill_value": 0,
        },
    }


def _open_array(path: Path, context: ts.Context | None = None) -> ts.TensorStore:
    """Open an existing site array for reading; a missing chunk is an error, never fill values."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "fill_missing_data_reads": False, "recheck_cached_data": "open", "recheck_cached_metadata": "open"}
    try:
        return ts.open(spec, open=True, read=True, context=context or _read_context()).result()
    except ValueError as e:
        reason = " ".join(str(e).split(" [tensorstore_spec=")[0].split())  # the spec is long and says nothing new
        raise StoreError(f"{path}/zarr.json: cannot open the array ({reason}); the store is damaged, "
                         "re-create it.") from None


def _read_context() -> ts.Context:
    return ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})


def _as_2d(array: np.ndarray, d_model: int, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim < 2:
        raise StoreError(f"{where}: rows have shape {array.shape}; pass arrays of 2 or more dimensions "
                         "[rows, d_model] (or [..., d_model]).")
    if array.shape[-1] != d_model:
        raise StoreError(f"{where}: rows have shape {array.shape} but the store's d_model is {d_model}; "
                         "pass arrays [n, d_model].")
    if array.dtype not in INPUT_DTYPES:
        raise StoreError(f"{where}: unsupported dtype {array.dtype}; pass float16, bfloat16, float32 or float64 "
                         "activations.")
    return array.reshape(-1, d_model)


def to_float32(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``rows`` as float32 (into ``out`` if given). bfloat16 widens exactly, its 16 bits becoming
    the top half of a float32: one integer shift, several times faster than a cast."""
    if rows.dtype == np.float32:
        if out is None:
            return rows
        np.copyto(out, rows)
        return out
    out = np.empty(rows.shape, np.float32) if out is None else out
    bits = out.view(np.uint32)
    np.copyto(bits, rows.view(np.uint16))
    bits <<= 16
    return out


# --------------------------------------------------------------------------- writer


def create_store(path, *, d_model: int, dtype: str = "float32", sites: Sequence[str] = ("activations",),
                 source: dict | None = None, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
                 rows_per_shard: int | None = None, resume: bool = False, overwrite: bool = False) -> StoreWriter:
    """Start writing a store at ``path`` (through ``path.partial``); append rows, then ``finalize``.

    ``resume=True`` reopens an unfinalized ``path.partial`` and continues after its last whole
    shard (``writer.n_written`` says where; ``check_resumed_source`` compares its settings);
    with no partial store it starts afresh. ``overwrite=True`` deletes a partial store and
    starts afresh; a finalized store at ``path`` is replaced only when the new one is finalized.
    """
    path = _store_path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if resume and overwrite:
        raise StoreError(f"{path}: pass --resume or --overwrite (resume=True or overwrite=True), not both.")
    resuming = resume and partial.exists()
    replaces = _check_target(path, may_replace=overwrite or resuming)  # resuming: the partial came from overwrite
    if overwrite and partial.exists():
        shutil.rmtree(partial)
    if resuming:
        writer = StoreWriter.resume(path, partial, d_model=d_model, dtype=dtype, sites=sites)
    elif partial.exists():
        raise StoreError(f"{partial}: an unfinalized store is there (its writer stopped early); continue it with "
                         "--resume (resume=True in Python) or start over with --overwrite (overwrite=True).")
    else:
        writer = StoreWriter.create(path, partial, _new_layout(d_model, dtype, sites, source, rows_per_chunk,
                                                               rows_per_shard))
    writer.replaces = replaces
    return writer


def _store_path(path) -> Path:
    """``path`` as a Path with a name (so ``NAME.partial`` beside it exists); StoreError if it is empty."""
    if not str(path).strip():
        raise StoreError("the store path is empty; pass a store directory, e.g. runs/synth.")
    path = Path(path)
    return path if path.name else path.absolute()


def _check_target(path: Path, may_replace: bool) -> bool:
    """Whether a finalized store at ``path`` is to be replaced; StoreError if ``path`` is taken otherwise."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    if not (path / METADATA_FILE).is_file():
        raise StoreError(f"{path}: already exists and is not an activation store (no {METADATA_FILE}); choose a "
                         "new output directory, or delete it yourself.")
    if not may_replace:
        raise StoreError(f"{path}: a store already exists there; choose a new output directory, or replace it "
                         "with --overwrite (overwrite=True in Python).")
    return True


def check_resumed_source(writer: StoreWriter, source: dict) -> None:
    """StoreError when ``writer`` resumed a partial store that was started with another ``source``."""
    found, asked = writer.layout.get("source", {}), json.loads(json.dumps(source))
    if found != asked:
        raise StoreError(f"{writer.partial}: the unfinalized store there was started with other settings "
                         f"({', '.join(_changed_keys(found, asked))}); resume with the same ones, or {START_OVER}.")


def _changed_keys(found: dict, asked: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(found) | set(asked)):
        a, b = found.get(k), asked.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def _new_layout(d_model, dtype, sites, source, rows_per_chunk, rows_per_shard) -> dict:
    dtype = canonical_dtype(dtype)
    sites = list(sites)
    if not sites or len(set(sites)) != len(sites) or not all(_is_plain_name(s) for s in sites):
        raise StoreError(f"sites {sites}: give one or more distinct plain names (no '/', not 'metadata').")
    if int(d_model) <= 0 or int(rows_per_chunk) <= 0:
        raise StoreError(f"d_model={d_model}, rows_per_chunk={rows_per_chunk}: both must be positive.")
    rows_per_shard = rows_per_shard or _default_rows_per_shard(rows_per_chunk, d_model, dtype)
    if rows_per_shard % rows_per_chunk:
        raise StoreError(f"rows_per_shard={rows_per_shard} must be a multiple of rows_per_chunk={rows_per_chunk}.")
    try:
        json.dumps(source or {})
    except TypeError as e:
        raise StoreError(f"source: must be JSON-serialisable ({e}).") from None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "d_model": int(d_model), "dtype": dtype,
            "rows_per_chunk": int(rows_per_chunk), "rows_per_shard": int(rows_per_shard),
            "source": dict(source or {}), "n_tokens": 0,
            "sites": {s: {"checksums": []} for s in sites}, "files": {}}


def _is_plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") \
        and name not in (METADATA_FILE, PROGRESS_FILE) and not name.endswith(".tmp")


class StoreWriter:
    """Appends rows to an unfinalized store; whole shards are written as they fill up.

    Attributes:
        n_written: rows appended so far (after a resume: the rows already durable on disk).
        n_durable: rows written as whole shards and recorded in the progress file.
    """

    def __init__(self, path: Path, partial: Path, layout: dict, arrays: dict[str, ts.TensorStore]):
        self.path, self.partial, self.layout, self._arrays = path, partial, layout, arrays
        self.sites = tuple(layout["sites"])
        self.d_model = layout["d_model"]
        self._dtype = DTYPES[layout["dtype"]]
        self._shard_rows = layout["rows_per_shard"]
        self._buffers = {s: np.empty((self._shard_rows, self.d_model), self._dtype) for s in self.sites}
        self._filled = 0
        self.n_durable = layout["n_tokens"]
        self.replaces = False  # finalize replaces the store at ``path`` (create_store(..., overwrite=True))
        self._finalized = False

    @property
    def n_written(self) -> int:
        """Rows appended so far (durable plus buffered)."""
        return self.n_durable + self._filled

    @classmethod
    def create(cls, path: Path, partial: Path, layout: dict) -> StoreWriter:
        """A fresh partial store: the directory, one empty array per site, a progress file."""
        partial.mkdir(parents=True)
        arrays = {s: ts.open(_array_spec(partial / s, layout), create=True).result() for s in layout["sites"]}
        _write_json(partial / PROGRESS_FILE, layout)
        return cls(path, partial, layout, arrays)

    @classmethod
    def resume(cls, path: Path, partial: Path, *, d_model: int, dtype: str, sites: Sequence[str]) -> StoreWriter:
        """Reopen a partial store; rows after the last recorded whole shard are dropped."""
        progress_path = partial / PROGRESS_FILE
        if not progress_path.exists():
            raise StoreError(f"{progress_path}: missing, so the partial store cannot be resumed; {START_OVER}.")
        layout = _read_json(progress_path)
        asked = {"d_model": int(d_model), "dtype": canonical_dtype(dtype), "sites": list(sites)}
        found = {"d_model": layout.get("d_model"), "dtype": layout.get("dtype"), "sites": list(layout.get("sites", {}))}
        if asked != found:
            raise StoreError(f"{progress_path}: the partial store has {found} but resume asked for {asked}; "
                             f"resume with the same settings, or {START_OVER}.")
        n = layout["n_tokens"]
        arrays = {}
        for s in layout["sites"]:
            array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(partial / s)}},
                            open=True).result()
            arrays[s] = array.resize(exclusive_max=[n, layout["d_model"]]).result()
        log.info("resuming %s after %d durable rows", partial, n)
        return cls(path, partial, layout, arrays)

    def append(self, rows) -> None:
        """Add rows: an array [n, d_model] for a single-site store, or {site: array} with equal n."""
        per_site = self._per_site(rows)
        n = next(iter(per_site.values())).shape[0]
        done = 0
        while done < n:
            take = min(n - done, self._shard_rows - self._filled)
            for s, array in per_site.items():
                self._buffers[s][self._filled:self._filled + take] = array[done:done + take]
            self._filled += take
            done += take
            if self._filled == self._shard_rows:
                self._flush()

    def _per_site(self, rows) -> dict[str, np.ndarray]:
        self._check_open()
        if not isinstance(rows, dict):
            if len(self.sites) != 1:
                raise StoreError(f"{self.partial}: this store has sites {self.sites}; append {{site: rows}}.")
            rows = {self.sites[0]: rows}
        if set(rows) != set(self.sites):
            raise StoreError(f"{self.partial}: append got sites {sorted(rows)} but the store has {list(self.sites)}.")
        per_site = {s: _as_2d(a, self.d_model, f"{self.partial}/{s}") for s, a in rows.items()}
        if len({a.shape[0] for a in per_site.values()}) != 1:
            raise StoreError(f"{self.partial}: every site needs the same number of rows in one append.")
        return per_site

    def _flush(self) -> None:
        """Write the buffered rows as one shard per site, then record them in the progress file."""
        if not self._filled:
            return
        start, stop = self.n_durable, self.n_durable + self._filled
        for s in self.sites:
            rows = self._buffers[s][:self._filled]
            array = self._arrays[s].resize(exclusive_max=[stop, self.d_model], expand_only=True).result()
            array[start:stop].write(rows).result()
            self._arrays[s] = array
            self.layout["sites"][s]["checksums"].append(_digest(rows))
        self.layout["n_tokens"] = stop
        self.n_durable, self._filled = stop, 0
        _write_json(self.partial / PROGRESS_FILE, self.layout)

    def add_file(self, name: str, array: np.ndarray) -> None:
        """Save an extra array as ``name`` (.npy) in the store directory, checksummed like the shards."""
        self._check_open()
        if not _is_plain_name(name) or not name.endswith(".npy") or name.removesuffix(".npy") in self.sites:
            raise StoreError(f"add_file: '{name}' must be a plain file name ending in .npy, not a site name.")
        atomic_write(self.partial / name, lambda path: _write_npy(path, np.asarray(array)))
        self.layout["files"][name] = _file_digest(self.partial / name)
        _write_json(self.partial / PROGRESS_FILE, self.layout)

    def finalize(self, *, norm_scalar: float | dict | None = None, extra_metadata: dict | None = None) -> Store:
        """Write the last rows, the norm scalar and metadata.json, then rename the store into place.

        ``norm_scalar``: E||x||^2 of the rows (one float for every site, or {site: float});
        None estimates it from a sample of up to 65536 rows per site.
        """
        self._flush()
        if self.n_durable == 0:
            self.abandon()
            raise StoreError(f"{self.partial}: no rows were appended; nothing to finalize.")
        for s in self.sites:
            given = norm_scalar.get(s) if isinstance(norm_scalar, dict) else norm_scalar
            stats = sample_stats(self._arrays[s], NORM_SAMPLE_ROWS)
            self.layout["sites"][s] |= {"norm_scalar": float(given) if given is not None else stats["mean_sq_norm"],
                                        "stats": stats}
        meta = self.layout | {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "extra": dict(extra_metadata or {})}
        _write_json(self.partial / METADATA_FILE, meta)
        fsync(self.partial)
        old = self._clear_target()
        os.rename(self.partial, self.path)  # the commit: before it there is no store, after it a whole one
        fsync(self.path.parent)
        if old is not None:
            shutil.rmtree(old)
        (self.path / PROGRESS_FILE).unlink()  # kept until now so that a crash before the rename can resume
        self._finalized = True
        return open_store(self.path)

    def _clear_target(self) -> Path | None:
        """Make room at ``path``: remove the caller's empty directory, or move aside the store it replaces."""
        if not self.path.exists():
            return None
        if not self.replaces:
            self.path.rmdir()
            return None
        old = self.path.with_name(self.path.name + REPLACED_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        os.rename(self.path, old)
        return old

    def abandon(self) -> None:
        """Delete the partial store when none of its rows is durable (nothing to resume); else keep it."""
        if self.n_durable == 0 and not self._finalized and self.partial.exists():
            shutil.rmtree(self.partial)

    def _check_open(self) -> None:
        if self._finalized:
            raise StoreError(f"{self.path}: the store is already finalized; it cannot change any more.")


def sample_stats(array: ts.TensorStore, max_rows: int, block_rows: int = DEFAULT_ROWS_PER_CHUNK) -> dict:
    """Statistics of up to ``max_rows`` rows read as evenly spaced blocks; non-finite rows are counted apart."""
    n = array.shape[0]
    starts = _sample_starts(n, max_rows, block_rows)
    sq, abs_max, bad = [], 0.0, 0
    for start in starts:
        rows = to_float32(array[start:min(start + block_rows, n)].read().result())
        finite = np.isfinite(rows).all(axis=1)
        bad += int((~finite).sum())
        rows = rows[finite]
        sq.append(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
        abs_max = max(abs_max, float(np.abs(rows).max(initial=0.0)))
    sq = np.concatenate(sq)
    norms = np.sqrt(sq)
    return {"sample_rows": int(sq.size + bad), "mean_sq_norm": float(sq.mean()) if sq.size else float("nan"),
            "mean_norm": float(norms.mean()) if sq.size else float("nan"),
            "std_norm": float(norms.std()) if sq.size else float("nan"), "max_abs": abs_max, "nonfinite_rows": bad}


def _sample_starts(n: int, max_rows: int, block_rows: int) -> np.ndarray:
    if n <= max_rows:
        return np.arange(0, n, block_rows)
    k = max(1, max_rows // block_rows)
    return np.linspace(0, n - block_rows, k).astype(np.int64)


# --------------------------------------------------------------------------- reader


def open_store(path) -> Store:
    """Open a finalized store; StoreError if it is missing, unfinalized or its metadata is damaged."""
    path = _store_path(path)
    meta_path = path / METADATA_FILE
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not an activation store (a directory with {METADATA_FILE}); pass a "
                         "store directory made by `sae-jax synth`, `sae-jax store import` or `sae-jax harvest`.")
    if not meta_path.exists():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if (path / PROGRESS_FILE).exists() or partial.exists():
            where = path if (path / PROGRESS_FILE).exists() else partial
            raise StoreError(f"{where}: the store is unfinalized (its writer stopped before finalize); rerun "
                             "the command that wrote it with --resume (resume=True in Python), or re-create it.")
        if not path.exists():
            raise StoreError(f"{path}: no such store; make one with `sae-jax synth`, `sae-jax store import` "
                             "or `sae-jax harvest`.")
        raise StoreError(f"{meta_path}: missing, so {path} is not a finalized activation store.")
    return Store(path, _check_metadata(meta_path, _read_json(meta_path)))


def _check_metadata(meta_path: Path, meta: dict) -> dict:
    need = ("format", "format_version", "d_model", "n_tokens", "dtype", "rows_per_chunk", "rows_per_shard", "sites")
    missing = [k for k in need if k not in meta]
    if missing:
        raise StoreError(f"{meta_path}: missing field(s) {missing}; the store is damaged, re-create it.")
    if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{meta_path}: format {meta['format']!r} version {meta['format_version']} is not "
                         f"{FORMAT!r} version {FORMAT_VERSION}; re-create the store with this version.")

    def bad(key: str, expected: str, got, shown: str | None = None) -> StoreError:
        got = shown or repr(got)
        return StoreError(f"{meta_path}: field '{key}' must be {expected}, got {got}; the store is damaged, "
                          "re-create it.")

    for key in ("d_model", "n_tokens", "rows_per_chunk", "rows_per_shard"):
        if not _is_int(meta[key]) or meta[key] <= 0:
            raise bad(key, "a positive integer", meta[key])
    if meta["rows_per_shard"] % meta["rows_per_chunk"]:
        raise bad("rows_per_shard", f"a multiple of rows_per_chunk ({meta['rows_per_chunk']})",
                  meta["rows_per_shard"])
    if not isinstance(meta["dtype"], str):
        raise bad("dtype", "float32 or bfloat16", meta["dtype"])
    canonical_dtype(meta["dtype"], where=f"{meta_path}: field 'dtype'")
    if not isinstance(meta["sites"], dict) or not meta["sites"]:
        raise bad("sites", "a mapping of site names to their checksums and norm scalar", meta["sites"])
    n_shards = math.ceil(meta["n_tokens"] / meta["rows_per_shard"])
    for s, site in meta["sites"].items():
        checksums = site.get("checksums") if isinstance(site, dict) else None
        if not isinstance(checksums, list) or len(checksums) != n_shards or not all(
                isinstance(c, str) for c in checksums):
            shown = f"a list of {len(checksums)}" if isinstance(checksums, list) else None
            raise bad(f"sites.{s}.checksums", f"a list of {n_shards} checksum string(s), one per shard",
                      checksums if isinstance(site, dict) else site, shown)
        norm = site.get("norm_scalar")
        if isinstance(norm, bool) or not isinstance(norm, (int, float)):
            raise bad(f"sites.{s}.norm_scalar", "a number", norm)
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Store:
    """A finalized store, opened for reading.

    Attributes:
        path: the store directory.
        metadata: the parsed metadata.json.
        d_model, n_tokens, dtype: shape and storage dtype ('float32' or 'bfloat16').
        sites: site names in metadata order; ``sites[0]`` is the default site.
        norm_scalar: E||x||^2 of the default site (``norm_scalars`` has every site's).
        identity: a stable id of the store's content (hash of its metadata, checksums included).
    """

    def __init__(self, path: Path, metadata: dict):
        self.path, self.metadata = path, metadata
        self.d_model, self.n_tokens = int(metadata["d_model"]), int(metadata["n_tokens"])
        self.dtype = metadata["dtype"]
        self.sites = tuple(metadata["sites"])
        self.norm_scalars = {s: float(v["norm_scalar"]) for s, v in metadata["sites"].items()}
        self.norm_scalar = self.norm_scalars[self.sites[0]]
        self.rows_per_chunk = int(metadata["rows_per_chunk"])
        self.rows_per_shard = int(metadata["rows_per_shard"])
        blob = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
        self.identity = hashlib.sha256(blob).hexdigest()[:16]
        self._context = _read_context()
        self._arrays: dict[str, ts.TensorStore] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, id={self.identity})"

    def site_name(self, site: str | None) -> str:
        """The site to read (None = the default one); StoreError naming the choices if unknown."""
        if site is None:
            return self.sites[0]
        if site not in self.sites:
            raise StoreError(f"{self.path / METADATA_FILE}: no site '{site}'; the store has {list(self.sites)}.")
        return site

    def array(self, site: str | None = None) -> ts.TensorStore:
        """The raw tensorstore array of a site, in its storage dtype (opened once)."""
        site = self.site_name(site)
        if site not in self._arrays:
            array = _open_array(self.path / site, self._context)
            if tuple(array.shape) != (self.n_tokens, self.d_model) or array.dtype.name != self.dtype:
                raise StoreError(f"{self.path / site}/zarr.json: array is {array.shape} {array.dtype.name} but "
                                 f"metadata.json says ({self.n_tokens}, {self.d_model}) {self.dtype}; "
                                 "the store is damaged, re-create it.")
            self._arrays[site] = array
        return self._arrays[site]

    def read_async(self, start: int, stop: int, *, site: str | None = None) -> ts.Future:
        """Start reading rows [start, stop) of a site (in the storage dtype); ``read_result`` waits
        for it and returns float32."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise StoreError(f"{self.path}: rows [{start}, {stop}) are outside [0, {self.n_tokens}).")
        return self.array(site)[start:stop].read()

    def read_result(self, future: ts.Future, what: str) -> np.ndarray:
        """The rows of a ``read_async`` future as float32; a damaged or missing shard becomes a StoreError."""
        return to_float32(self.checked_result(future, what))

    def checked_result(self, future, what: str):
        """``future.result()``, with a damaged or missing shard turned into a StoreError naming ``what``."""
        try:
            return future.result()
        except ValueError as e:
            raise StoreError(f"{self.path}: cannot read {what}: {e}. The store is damaged; "
                             f"run `sae-jax store verify {self.path}` and re-create the damaged part.") from None

    def read(self, start: int, stop: int, *, site: str | None = None) -> np.ndarray:
        """Rows [start, stop) of a site as float32 [stop - start, d_model]."""
        site = self.site_name(site)
        return self.read_result(self.read_async(start, stop, site=site), f"rows {start}:{stop} of site '{site}'")

    def check_d_model(self, expected: int, field: str = "model.d_model") -> None:
        """StoreError naming the metadata file and the config field when d_model disagrees."""
        if int(expected) != self.d_model:
            raise StoreError(f"{self.path / METADATA_FILE}: the store's d_model is {self.d_model} but {field} is "
                             f"{expected}; set {field}={self.d_model} or use a store of the right width.")

    def load_file(self, name: str, fix: str = "re-create the store") -> np.ndarray:
        """An extra array saved with ``StoreWriter.add_file``, checked against its digest in the metadata;
        StoreError naming the file and ending with ``fix`` when it is missing or changed."""
        files = self.metadata.get("files", {})
        if name not in files:
            raise StoreError(f"{self.path}: no extra file '{name}'; it has {sorted(files)}.")
        file = self.path / name
        if not file.is_file():
            raise StoreError(f"{file}: missing, though {METADATA_FILE} lists it; {fix}.")
        if _file_digest(file) != files[name]:
            raise StoreError(f"{file}: checksum mismatch (the file changed after the store was finalized); {fix}.")
        return np.load(file)

    def ground_truth(self) -> np.ndarray | None:
        """The true dictionary [F, d] of a synthetic store (checked like every extra file), or None."""
        fix = "re-create the store, or give `sae-jax eval` the true dictionary with --ground-truth FILE"
        if GROUND_TRUTH_FILE in self.metadata.get("files", {}):
            return self.load_file(GROUND_TRUTH_FILE, fix)
        if (self.path / GROUND_TRUTH_FILE).exists():
            raise StoreError(f"{self.path / GROUND_TRUTH_FILE}: not listed in {METADATA_FILE}, so it cannot be "
                             f"checked; {fix}.")
        return None

    def verify(self) -> list[str]:
        """Read every shard and extra file and compare checksums; the problems found (empty = all good)."""
        problems = []
        for site in self.sites:
            for k, expected in enumerate(self.metadata["sites"][site]["checksums"]):
                problems += self._verify_shard(site, k, expected)
        for name, expected in self.metadata.get("files", {}).items():
            file = self.path / name
            if not file.is_file():
                problems.append(f"{file}: extra file is missing")
            elif _file_digest(file) != expected:
                problems.append(f"{file}: checksum mismatch (the file changed after finalize)")
        return problems

    def _verify_shard(self, site: str, k: int, expected: str) -> list[str]:
        file = self.path / shard_file(site, k)
        if not file.is_file():
            return [f"{file}: shard file is missing (rows {k * self.rows_per_shard}+ of site '{site}')"]
        start, stop = k * self.rows_per_shard, min((k + 1) * self.rows_per_shard, self.n_tokens)
        try:
            rows = self.array(site)[start:stop].read().result()
        except (ValueError, StoreError) as e:
            return [f"{file}: unreadable ({e})"]
        if _digest(rows) != expected:
            return [f"{file}: checksum mismatch (content changed after it was written)"]
        return []


def verify(path) -> list[str]:
    """Problems found in the store at ``path`` (empty = every checksum matches)."""
    return open_store(path).verify()


def info(store) -> str:
    """Human-readable metadata and statistics of a store (a Store or a path)."""
    store = store if isinstance(store, Store) else open_store(store)
    m = store.metadata
    size = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    lines = [f"store       {store.path}  (id {store.identity})",
             f"format      {m['format']} v{m['format_version']}, created {m.get('created', '?')}",
             f"shape       {store.n_tokens:,} tokens × {store.d_model} ({store.dtype}), {size / 1e6:,.1f} MB on disk",
             f"layout      {m['rows_per_chunk']} rows per chunk, {store.rows_per_shard} rows per shard, "
             f"{math.ceil(store.n_tokens / store.rows_per_shard)} shard(s) per site"]
    lines += [f"source      {k}: {v}" for k, v in m.get("source", {}).items()]
    for s in store.sites:
        st = {"mean_norm": math.nan, "std_norm": math.nan, "max_abs": math.nan, "sample_rows": "?",
              "nonfinite_rows": "?"} | m["sites"][s].get("stats", {})
        lines.append(f"site        {s}: norm_scalar E||x||^2 = {store.norm_scalars[s]:.6g}; sample of "
                     f"{st['sample_rows']} rows: mean ||x|| {st['mean_norm']:.4g}, std ||x|| {st['std_norm']:.4g}, "
                     f"max |x| {st['max_abs']:.4g}, non-finite rows {st['nonfinite_rows']}")
    lines += [f"file        {name}" for name in m.get("files", {})]
    lines += [f"extra       {k}: {v}" for k, v in m.get("extra", {}).items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- import


def import_files(out, files: Iterable, *, dtype: str | None = None, site: str = "activations",
                 source: dict | None = None, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK, resume: bool = False,
                 overwrite: bool = False) -> Store:
    """A new store at ``out`` from .npy or .safetensors files [n, d] (or [..., d]), concatenated in order.

    A .safetensors file with one tensor fills ``site``; with several, each tensor name is a site
    (every file must hold the same names). ``dtype`` None keeps bfloat16 input as bfloat16 and
    stores anything else as float32. ``resume``/``overwrite`` as for ``create_store``: a resumed
    import continues after the durable rows, if its input files are the ones the partial store recorded.
    """
    files = [Path(f) for f in files]
    if not files:
        raise StoreError("store import: no input files given; pass --from FILE [FILE ...].")
    loaded = [_load_raw(f, site) for f in files]  # memory-mapped: every file is checked before writing
    d_model = _input_width(files, loaded)
    first = loaded[0]
    if dtype is None:
        dtype = "bfloat16" if all(a.dtype == DTYPES["bfloat16"] for a in first.values()) else "float32"
    source = source or {"imported_from": [str(f.resolve()) for f in files],
                        "input_bytes": [f.stat().st_size for f in files]}
    writer = create_store(out, d_model=d_model, dtype=dtype, sites=tuple(first), source=source,
                          rows_per_chunk=rows_per_chunk, resume=resume, overwrite=overwrite)
    check_resumed_source(writer, source)
    try:
        _append_inputs(writer, loaded, d_model)
        return writer.finalize()
    except BaseException:
        writer.abandon()
        raise


def _input_width(files: list[Path], loaded: list[dict[str, np.ndarray]]) -> int:
    """The d_model of the input files; StoreError naming the file unless every tensor is [..., d_model]
    with the same d_model and names, and some file has rows."""
    first = loaded[0]
    for file, arrays in zip(files, loaded, strict=True):
        if set(arrays) != set(first):
            raise StoreError(f"{file}: holds tensors {sorted(arrays)} but {files[0]} holds {sorted(first)}.")
        for name, array in arrays.items():
            if array.ndim < 2 or array.shape[-1] == 0:
                what = f"{file}: tensor '{name}'" if len(arrays) > 1 else f"{file}: the array"
                raise StoreError(f"{what} has shape {array.shape}; import arrays of 2 or more dimensions "
                                 "[rows, d_model] (or [..., d_model]), with d_model > 0.")
    d_model = next(iter(first.values())).shape[-1]
    for file, arrays in zip(files, loaded, strict=True):
        for array in arrays.values():
            _as_2d(array, d_model, str(file))
    if all(a.size == 0 for arrays in loaded for a in arrays.values()):
        shape = next(iter(first.values())).shape
        raise StoreError(f"{', '.join(map(str, files))}: no rows to import (shape {shape}); import files with at "
                         "least one row.")
    return d_model


def _append_inputs(writer: StoreWriter, loaded: list[dict[str, np.ndarray]], d_model: int) -> None:
    """Append the rows of every input, in order, after the ``writer.n_written`` rows it already has."""
    skip, step = writer.n_written, writer.layout["rows_per_shard"]
    for arrays in loaded:
        arrays = {s: a.reshape(-1, d_model) for s, a in arrays.items()}
        n = next(iter(arrays.values())).shape[0]
        for start in range(min(skip, n), n, step):
            writer.append({s: a[start:start + step] for s, a in arrays.items()})
        skip = max(0, skip - n)


def _load_raw(file: Path, site: str) -> dict[str, np.ndarray]:
    """{site: array} memory-mapped from a .npy or .safetensors file, dtype checked."""
    if file.is_dir():
        raise StoreError(f"{file}: is a directory; pass the .npy or .safetensors files in it.")
    if not file.is_file():
        raise StoreError(f"{file}: no such file.")
    try:
        if file.suffix == ".npy":
            arrays = {site: np.load(file, mmap_mode="r")}
        elif file.suffix == ".safetensors":
            arrays = _load_safetensors(file)
            arrays = {site: arrays.popitem()[1]} if len(arrays) == 1 else arrays
        else:
            raise StoreError(f"{file}: unsupported file type '{file.suffix}'; import .npy or .safetensors files.")
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{file}: cannot read it ({e}); the file is truncated or not a valid {file.suffix}.") \
            from None
    for name, array in arrays.items():
        if array.dtype not in INPUT_DTYPES:
            raise StoreError(f"{file}: tensor '{name}' has unsupported dtype {array.dtype}; "
                             "import float16, bfloat16, float32 or float64 activations.")
    return arrays


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file, memory-mapped (bfloat16 included, which numpy lacks)."""
    from safetensors import safe_open

    dtypes = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": DTYPES["bfloat16"]}
    try:  # the package validates the header and the file size
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise StoreError(f"{file}: not a valid .safetensors file ({e}).") from None
    header_len = int(np.fromfile(file, dtype="<u8", count=1)[0])
    header = json.loads(np.fromfile(file, dtype=np.uint8, count=header_len, offset=8).tobytes())
    out = {}
    for name in sorted(names):
        t = header[name]
        if t["dtype"] not in dtypes:
            raise StoreError(f"{file}: tensor '{name}' has unsupported dtype {t['dtype']}; "
                             "import F16, BF16, F32 or F64 activations.")
        begin, end = t["data_offsets"]
        out[name] = np.memmap(file, dtype=dtypes[t["dtype"]], mode="r", offset=8 + header_len + begin,
                              shape=tuple(t["shape"]))
        if out[name].nbytes != end - begin:
            raise StoreError(f"{file}: tensor '{name}' has {end - begin} bytes for shape {t['shape']}.")
    return out

