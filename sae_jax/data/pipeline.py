"""The training input pipeline on grain: shuffled block reads, per-process shares, exact resume.

How rows flow, for one split [lo, hi) of a store:

1. Epoch e orders the split's blocks (``block_rows`` contiguous rows each; by default one
   store chunk) by a permutation seeded with (seed, e), the same on every process. Laid end to
   end they give the epoch's row sequence.
2. Process p owns the p-th of ``process_count`` equal, contiguous stretches of that sequence
   (R = n // process_count rows; at most process_count - 1 rows of an epoch go unused), so no
   token is read by two processes and every process has the same number of rows per epoch.
3. A stretch is cut into windows, each read with one tensorstore read (chunks decoded
   concurrently and copied straight into place) in the storage dtype:
   - ``shuffle_blocks = 0``: a window is one local batch. With small blocks a batch already
     mixes many random stretches of the store (32 blocks of 128 rows in a batch of 4096), and
     no row is copied again: this is the fast path.
   - ``shuffle_blocks = S > 0``: a window is S blocks and its rows are permuted in memory
     (seeded with seed, e, p and the window): the shuffle buffer, for stores with large
     chunks. The gather costs one more pass over the rows.
   The default (None) picks 0 when a local batch holds at least ``MIN_BLOCKS_PER_BATCH``
   blocks and 16 otherwise.
4. Windows are numbered across epochs; grain reads them ahead in background threads, in order.
5. Local batches of batch_size // process_count rows are cut from consecutive windows, widened
   to float32 (or left in the store's dtype, for the device to widen) and checked for NaN/Inf
   in one more background thread (a batch may span two windows or two epochs); global batch i
   is the concatenation of the local batches over processes in process order.

The iterator state is (window, offset into it, skipped-row count, batch count): restoring it
re-reads one window and continues with exactly the batches that would have come next.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grain
import numpy as np
import tensorstore as ts

from sae_jax.data.store import DTYPES, Store, StoreError, shard_file, to_float32

log = logging.getLogger(__name__)

SPLIT_ALIGN = 1024
MIN_BLOCKS_PER_BATCH = 16  # below this many blocks per local batch, the default adds a shuffle buffer
DEFAULT_SHUFFLE_BLOCKS = 16
ALIGN = 64  # bytes; batches aligned to this are used in place by jax's CPU backend
NONFINITE = ("error", "skip", "allow")
STATE_VERSION = 1
_FOREVER = sys.maxsize // 2


def split_bounds(n_tokens: int, holdout_fraction: float, align: int = SPLIT_ALIGN) -> dict:
    """{"train": (0, n_train), "holdout": (n_train, n_tokens), "all": (0, n_tokens)}.

    The holdout is the tail: at least ``holdout_fraction`` of the tokens, grown so that the
    train split is a whole number of ``align``-row blocks (unless that would empty it).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction={holdout_fraction} must be in [0, 1).")
    n_train = n_tokens - math.ceil(n_tokens * holdout_fraction)
    if holdout_fraction > 0 and n_train >= align:
        n_train -= n_train % align
    if n_train <= 0:
        raise ValueError(f"a store of {n_tokens} tokens is too small for data.holdout_fraction={holdout_fraction}.")
    return {"train": (0, n_train), "holdout": (n_train, n_tokens), "all": (0, n_tokens)}


def _split(store: Store, split: str, holdout_fraction: float) -> tuple[int, int]:
    bounds = split_bounds(store.n_tokens, holdout_fraction)
    if split not in bounds:
        raise ValueError(f"split '{split}' is not one of {sorted(bounds)}.")
    lo, hi = bounds[split]
    if hi <= lo:
        raise ValueError(f"split '{split}' of {store.path} is empty (data.holdout_fraction={holdout_fraction}).")
    return lo, hi


# --------------------------------------------------------------------------- the plan: pure index arithmetic


@dataclass(frozen=True)
class WindowPlan:
    """Which store rows make up window i of this process, and in what order they come out."""

    lo: int
    hi: int
    block_rows: int
    window_rows: int
    shuffle_rows: bool
    seed: int
    process_index: int
    process_count: int
    num_epochs: int | None

    @property
    def rows_per_process(self) -> int:
        """Rows each process gets per epoch."""
        return (self.hi - self.lo) // self.process_count

    @property
    def windows_per_epoch(self) -> int:
        """Windows of this process per epoch (the last one may be short)."""
        return math.ceil(self.rows_per_process / self.window_rows)

    def __len__(self) -> int:
        epochs = _FOREVER // self.windows_per_epoch if self.num_epochs is None else self.num_epochs
        return self.windows_per_epoch * epochs

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a plan lives as long as its loader
    def block_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first store row, size, start in the epoch's row sequence) of each block, in epoch order."""
        n = self.hi - self.lo
        perm = np.random.default_rng([self.seed, epoch]).permutation(math.ceil(n / self.block_rows))
        first = self.lo + perm * self.block_rows
        sizes = np.minimum(self.block_rows, self.hi - first)
        return first, sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def pieces(self, index: int) -> list[tuple[int, int]]:
        """Store row ranges [start, stop) of window ``index``, in sequence order (block reads)."""
        epoch, w = divmod(index, self.windows_per_epoch)
        a = self.process_index * self.rows_per_process + w * self.window_rows
        b = min(a + self.window_rows, (self.process_index + 1) * self.rows_per_process)
        first, sizes, starts = self.block_order(epoch)
        out = []
        for j in range(np.searchsorted(starts, a, side="right") - 1, np.searchsorted(starts, b, side="left")):
            lo, hi = max(a, starts[j]) - starts[j], min(b - starts[j], sizes[j])
            out.append((int(first[j] + lo), int(first[j] + hi)))
        return out

    def row_order(self, index: int, n: int) -> np.ndarray | None:
        """The in-memory shuffle of a window's n rows (None: rows come out as read)."""
        if not self.shuffle_rows:
            return None
        epoch, w = divmod(index, self.windows_per_epoch)
        return np.random.default_rng([self.seed, epoch, self.process_index, w, 1]).permutation(n)


# --------------------------------------------------------------------------- grain nodes


@dataclass
class Window:
    """One window as read: rows in storage order (block after block), the shuffle to apply on the
    way out, and the store row ranges they came from."""

    index: int
    rows: np.ndarray  # [n, d_model] in the store's dtype
    order: np.ndarray | None  # the in-memory shuffle: output row j is rows[order[j]] (None: rows[j])
    pieces: list[tuple[int, int]]


class WindowSource:
    """grain random-access source: element i is window i of this process, read as whole blocks.

    Its ``repr`` names the store's identity and the plan, so grain can tell when a saved state
    belongs to other data.
    """

    def __init__(self, store: Store, plan: WindowPlan, site: str, nonfinite: str):
        self.store, self.plan, self.site, self.nonfinite = store, plan, site, nonfinite
        self.rows_read = 0
        """Rows this source has read from the store (windows read ahead included), counted at each read."""
        self._count = threading.Lock()

    def __len__(self) -> int:
        return len(self.plan)

    def __repr__(self) -> str:
        p = self.plan
        return (f"WindowSource(store={self.store.identity}, site={self.site}, rows=[{p.lo}, {p.hi}), seed={p.seed}, "
                f"block_rows={p.block_rows}, window_rows={p.window_rows}, shuffle_rows={p.shuffle_rows}, "
                f"process={p.process_index}/{p.process_count}, epochs={p.num_epochs}, nonfinite={self.nonfinite})")

    def __getitem__(self, index: int) -> Window:
        pieces = self.plan.pieces(index)
        array = self.store.array(self.site)
        rows = aligned_empty((sum(b - a for a, b in pieces), self.store.d_model), DTYPES[self.store.dtype])
        # One copy of the blocks laid end to end: tensorstore decodes the chunks concurrently and
        # writes each straight into place in an aligned buffer (which a CPU device can then use as is).
        done = ts.array(rows, copy=False, write=True).write(ts.concat([array[a:b] for a, b in pieces], axis=0))
        self.store.checked_result(done, f"window {index} (rows {pieces}) of site '{self.site}'")
        with self._count:
            self.rows_read += len(rows)
        return Window(index, rows, self.plan.row_order(index, len(rows)), pieces)

    def row_ids(self, window: Window, positions: np.ndarray) -> np.ndarray:
        """Store rows of a window's output positions (for error messages)."""
        ids = np.concatenate([np.arange(a, b) for a, b in window.pieces])
        return ids[positions if window.order is None else window.order[positions]]


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty aligned to ALIGN bytes: jax's CPU backend then takes the array without a copy."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGN, np.uint8)
    start = -buffer.ctypes.data % ALIGN
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def gather(rows: np.ndarray, idx: np.ndarray | None, out: np.ndarray) -> None:
    """out[:] = rows[idx] in out's dtype, the store's or float32 (idx None: the first len(out) rows)."""
    if idx is not None and rows.dtype == out.dtype:
        np.take(rows, idx, axis=0, out=out)
    elif idx is not None:
        to_float32(np.take(rows.view(np.uint16), idx, axis=0).view(rows.dtype), out)
    elif rows.dtype == out.dtype:
        np.copyto(out, rows[:len(out)])
    else:
        to_float32(rows[:len(out)], out)


def nonfinite_rows(rows: np.ndarray) -> np.ndarray | None:
    """Indices of rows holding NaN or Inf, or None when every row is finite (the fast, usual case)."""
    if rows.dtype == np.float32:
        with np.errstate(over="ignore"):
            if np.isfinite(rows.sum()):  # finite when every entry is (barring overflow, which falls through)
                return None
        bad = ~np.isfinite(rows).all(axis=1)
    else:  # bfloat16 is NaN or Inf exactly when its 8 exponent bits are all set: as int16 that is
        # 0x7F80 and up (positive), as uint16 0xFF80 and up (negative); two max reductions, no copy
        bits = rows.view(np.uint16)
        if bits.view(np.int16).max(initial=0) < 0x7F80 and bits.max(initial=0) < 0xFF80:
            return None
        bad = ((bits & 0x7F80) == 0x7F80).any(axis=1)
    bad = np.flatnonzero(bad)
    return bad if bad.size else None


def nonfinite_error(store: Store, site: str, row: int, count: int,
                    fix: str = "set data.nonfinite=skip") -> StoreError:
    """The error for a row with NaN/Inf, naming its shard file; ``fix`` names the option that skips such rows."""
    return StoreError(f"{store.path / shard_file(site, row // store.rows_per_shard)}: row {row} of site '{site}' "
                      f"holds NaN or Inf ({count} such row(s) in this read); {fix} to drop such rows, or re-create "
                      "the store.")


class BatchRows(grain.IterDataset):
    """Fixed-size batches (in ``dtype``) cut from a stream of windows (a batch may span windows)."""

    def __init__(self, parent: grain.IterDataset, source: WindowSource, batch_rows: int, dtype: np.dtype):
        super().__init__(parent)
        self.source, self.batch_rows, self.dtype = source, batch_rows, dtype

    def __iter__(self) -> BatchRowsIterator:
        return BatchRowsIterator(self._parent.__iter__(), self.source, self.batch_rows, self.dtype)

    def __str__(self) -> str:
        return f"BatchRows(batch_rows={self.batch_rows}, dtype={self.dtype})"


class BatchRowsIterator(grain.DatasetIterator):
    """Iterator of ``BatchRows``. Its state is four ints: the window being read, how many of its
    (shuffled) rows were consumed, the non-finite rows skipped so far, and batches delivered."""

    def __init__(self, parent: grain.DatasetIterator, source: WindowSource, batch_rows: int, dtype: np.dtype):
        super().__init__(parent)
        self._source, self._batch_rows, self._dtype = source, batch_rows, dtype
        self._window: Window | None = None
        self._offset = 0  # rows of the current window consumed
        self._next_window = 0  # index of the next window to pull from the parent
        self._resume_offset = 0  # rows of the next window consumed before a restore
        self.skipped = 0  # non-finite rows skipped so far
        self.batches = 0

    def __next__(self) -> np.ndarray:
        if self._window is None or self._offset == len(self._window.rows):
            self._pull()
        whole = self._whole_window()
        if whole is not None:
            self.batches += 1
            return whole
        out = aligned_empty((self._batch_rows, self._source.store.d_model), self._dtype)
        filled = 0
        while filled < self._batch_rows:
            if self._window is None or self._offset == len(self._window.rows):
                self._pull()
            filled = self._fill(out, filled)
        self.batches += 1
        return out

    def _whole_window(self) -> np.ndarray | None:
        """A fresh, unshuffled window of exactly one batch of finite rows in the output dtype,
        handed on without a copy; None otherwise (the general path then copies)."""
        w = self._window
        if w.order is not None or self._offset or len(w.rows) != self._batch_rows or w.rows.dtype != self._dtype:
            return None
        if self._source.nonfinite != "allow" and nonfinite_rows(w.rows) is not None:
            return None
        self._offset = len(w.rows)
        return w.rows

    def _fill(self, out: np.ndarray, filled: int) -> int:
        """Move rows of the current window into out[filled:]; returns the new fill level."""
        w = self._window
        take = min(len(out) - filled, len(w.rows) - self._offset)
        dst = out[filled:filled + take]
        if w.order is None:
            gather(w.rows[self._offset:self._offset + take], None, dst)
        else:
            gather(w.rows, w.order[self._offset:self._offset + take], dst)
        bad = None if self._source.nonfinite == "allow" else nonfinite_rows(dst)
        if bad is not None:
            if self._source.nonfinite == "error":
                row = self._source.row_ids(w, self._offset + bad[:1])[0]
                raise nonfinite_error(self._source.store, self._source.site, int(row), len(bad))
            good = np.delete(dst, bad, axis=0)
            dst[:len(good)] = good
            self.skipped += len(bad)
            take_good = len(good)
        else:
            take_good = take
        self._offset += take
        return filled + take_good

    def _pull(self) -> None:
        self._window = None
        window = next(self._parent)  # StopIteration ends the stream; a partial last batch is dropped
        if window.index != self._next_window or len(window.rows) < self._resume_offset:
            raise ValueError(f"window {window.index} ({len(window.rows)} rows) does not fit the iterator state "
                             f"(window {self._next_window}, row {self._resume_offset}); the state belongs to other "
                             "data.")
        self._window, self._offset, self._resume_offset = window, self._resume_offset, 0
        self._next_window += 1

    def get_state(self) -> dict:
        """The position as plain ints (see the class docstring)."""
        w = self._window
        if w is not None and self._offset < len(w.rows):
            window, offset = w.index, self._offset
        else:
            window, offset = self._next_window, self._resume_offset
        return {"window": window, "offset": offset, "skipped": self.skipped, "batches": self.batches}

    def set_state(self, state: dict) -> None:
        """Continue from a ``get_state`` result; the window it names is read again on the next batch."""
        grain.experimental.set_next_index(self._parent, int(state["window"]))
        self._window, self._offset = None, 0
        self._next_window, self._resume_offset = int(state["window"]), int(state["offset"])
        self.skipped, self.batches = int(state["skipped"]), int(state["batches"])


def batch_dataset(source: WindowSource, batch_rows: int, prefetch: int = 2, threads: int | None = None,
                  dtype: np.dtype | type = np.float32) -> grain.IterDataset:
    """The grain dataset of one process's local batches ([batch_rows, d_model] in ``dtype``).

    Windows are read ``prefetch`` ahead by a thread pool; batches are assembled ahead in one
    more thread, so the consumer only takes finished arrays.
    """
    windows = grain.MapDataset.source(source)
    threads = threads or max(1, min(prefetch, os.cpu_count() or 1))
    options = grain.ReadOptions(num_threads=threads if prefetch else 0, prefetch_buffer_size=prefetch)
    batches = BatchRows(windows.to_iter_dataset(options), source, batch_rows, np.dtype(dtype))
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)


# --------------------------------------------------------------------------- the loader


class ActivationLoader:
    """Checkpointable iterator over this process's share of each global batch.

    ``next(loader)`` is [batch_size // process_count, d_model] in float32 (``dtype="float32"``)
    or in the store's dtype (``dtype="storage"``: half the bytes of a bfloat16 store to move to
    the device, which widens it in the train step); global batch i is the
    concatenation over processes in process order, and over an epoch the processes' rows
    together are a permutation of the split (less at most process_count - 1 rows).

    With ``num_epochs`` set the stream ends after that many epochs (a partial last batch is
    dropped); None repeats forever. With nonfinite='skip' each process drops its own bad rows,
    so its epochs end at slightly different batches than other processes'; a run that stops
    after a number of steps (not at the end of the data) is unaffected.

    Attributes:
        epoch: the epoch the next row comes from (0-based; = epochs completed at a boundary).
        tokens_seen: tokens of the global batches delivered so far.
        skipped_rows: non-finite rows this process dropped (nonfinite='skip').
    """

    def __init__(self, store: Store, *, batch_size: int, seed: int, split: str = "train",
                 holdout_fraction: float = 0.05, process_index: int = 0, process_count: int = 1,
                 block_rows: int | None = None, shuffle_blocks: int | None = None, num_epochs: int | None = None,
                 prefetch: int = 2, nonfinite: str = "error", site: str | None = None, dtype: str = "float32"):
        _check_args(batch_size, process_index, process_count, block_rows, shuffle_blocks, num_epochs, nonfinite)
        self.store, self.site = store, store.site_name(site)
        self.batch_size, self.process_count = batch_size, process_count
        lo, hi = _split(store, split, holdout_fraction)
        if hi - lo < process_count:
            raise ValueError(f"split '{split}' has {hi - lo} rows, fewer than the {process_count} processes.")
        batch_rows = batch_size // process_count
        self.block_rows = block_rows or store.rows_per_chunk
        if self.block_rows % store.rows_per_chunk:
            log.warning("%s: data.block_rows=%d is not a multiple of the store's %d rows per chunk; reads decode "
                        "whole chunks, so part of each read is wasted.", store.path, self.block_rows,
                        store.rows_per_chunk)
        self.shuffle_blocks = default_shuffle_blocks(batch_rows, self.block_rows) if shuffle_blocks is None \
            else shuffle_blocks
        window_rows = self.block_rows * self.shuffle_blocks if self.shuffle_blocks else batch_rows
        self.plan = WindowPlan(lo, hi, self.block_rows, window_rows, bool(self.shuffle_blocks), int(seed) % 2**32,
                               process_index, process_count, num_epochs)
        self.source = WindowSource(store, self.plan, self.site, nonfinite)
        if dtype not in ("float32", "storage"):
            raise ValueError(f"dtype='{dtype}' must be 'float32' or 'storage'.")
        self.dtype = np.dtype(np.float32) if dtype == "float32" else DTYPES[store.dtype]
        self.dataset = batch_dataset(self.source, batch_rows, prefetch, dtype=self.dtype)
        self._it = self.dataset.__iter__()
        self._reported_skips = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        batch = next(self._it)
        if self.skipped_rows > self._reported_skips:
            log.warning("%s: skipped %d rows with NaN/Inf so far (site '%s')", self.store.path, self.skipped_rows,
                        self.site)
            self._reported_skips = self.skipped_rows
        return batch

    @property
    def epoch(self) -> int:
        """The epoch the next row comes from."""
        return self._it.get_state()["window"] // self.plan.windows_per_epoch

    @property
    def tokens_seen(self) -> int:
        """Tokens of the global batches delivered so far (batches × batch_size)."""
        return self._it.get_state()["batches"] * self.batch_size

    @property
    def skipped_rows(self) -> int:
        """Rows with NaN/Inf this process dropped so far."""
        return self._it.get_state()["skipped"]

    @property
    def rows_read(self) -> int:
        """Rows this process has read from the store since the loader started (read-ahead included):
        counted where the store is read, so a test can see each process read only its own share."""
        return self.source.rows_read

    def _identity(self) -> dict:
        return {"store": self.store.identity, "source": repr(self.source)}

    def get_state(self) -> dict:
        """A JSON-serialisable state; ``set_state`` on a loader built the same way continues exactly."""
        return {"version": STATE_VERSION, **self._identity(), "iterator": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue from ``get_state``; ValueError if it was saved for other data or other settings."""
        if state.get("version") != STATE_VERSION or state.get("store") != self.store.identity:
            raise ValueError(f"the data-iterator state was saved for store {state.get('store')} but {self.store.path} "
                             f"is {self.store.identity}; resume with the same store.")
        if state.get("source") != self._identity()["source"]:
            raise ValueError(f"the data-iterator state was saved with other data settings:\n  saved: "
                             f"{state.get('source')}\n  now:   {self._identity()['source']}")
        self._it.set_state(state["iterator"])

    def close(self) -> None:
        """Stop the background readers."""
        self._it.close()


def default_shuffle_blocks(batch_rows: int, block_rows: int) -> int:
    """0 (batches read straight from random blocks) when a local batch spans at least
    MIN_BLOCKS_PER_BATCH blocks; otherwise a shuffle buffer of DEFAULT_SHUFFLE_BLOCKS blocks."""
    return 0 if batch_rows >= MIN_BLOCKS_PER_BATCH * block_rows else DEFAULT_SHUFFLE_BLOCKS


def _check_args(batch_size, process_index, process_count, block_rows, shuffle_blocks, num_epochs, nonfinite):
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the {process_count} "
                         "processes.")
    if (block_rows is not None and block_rows < 0) or (shuffle_blocks is not None and shuffle_blocks < 0):
        raise ValueError(f"data.block_rows={block_rows} and data.shuffle_blocks={shuffle_blocks} must be >= 0 "
                         "(block_rows 0: the store's rows per chunk; shuffle_blocks 0: no in-memory row shuffle).")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive (or None to repeat forever).")
    if nonfinite not in NONFINITE:
        raise ValueError(f"data.nonfinite='{nonfinite}' must be one of {NONFINITE}.")


# --------------------------------------------------------------------------- evaluation and devices


def iter_eval(store: Store, *, batch_size: int, split: str = "holdout", max_tokens: int | None = None,
              holdout_fraction: float = 0.05, site: str | None = None, nonfinite: str = "error",
              fix: str = "set data.nonfinite=skip"):
    """Deterministic, unshuffled float32 batches covering a split ("train", "holdout" or "all").

    The last batch may be shorter; the next batch is read while the caller works on this one.
    ``fix`` is how the error for a non-finite row (nonfinite='error') says to skip such rows.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"data.nonfinite='{nonfinite}' must be one of {NONFINITE}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"the evaluation batch size (--batch-size) must be a positive integer, got {batch_size!r}.")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"--max-tokens (max_tokens) must be a positive number of tokens, got {max_tokens!r}; "
                         "leave it out to evaluate every token.")
    site = store.site_name(site)
    lo, hi = _split(store, split, holdout_fraction)
    hi = hi if max_tokens is None else min(hi, lo + max_tokens)
    starts = list(range(lo, hi, batch_size))
    pending = store.read_async(lo, min(lo + batch_size, hi), site=site) if starts else None
    for i, start in enumerate(starts):
        stop = min(start + batch_size, hi)
        batch = store.read_result(pending, f"rows {start}:{stop} of site '{site}'")
        if i + 1 < len(starts):
            pending = store.read_async(stop, min(stop + batch_size, hi), site=site)
        bad = None if nonfinite == "allow" else nonfinite_rows(batch)
        if bad is not None and nonfinite == "error":
            raise nonfinite_error(store, site, start + int(bad[0]), len(bad), fix)
        yield batch if bad is None else np.delete(batch, bad, axis=0)


def to_global(local_batch: np.ndarray, sharding):
    """This process's rows as its part of a global jax.Array laid out by ``sharding``."""
    import jax

    return jax.make_array_from_process_local_data(sharding, local_batch)
