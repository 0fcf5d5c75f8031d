"""How time and memory are measured.

* Time: the median over repetitions.  On a GPU each repetition sits between two CUDA events
  recorded on the current stream (after warm-up, nothing synchronizes between repetitions, so a
  launch-bound call is charged its launch gaps); on the CPU each repetition is timed with
  ``time.perf_counter``.  The contenders of one case are interleaved (every round runs each
  once, in a seeded random order of its own: a call's time depends on the one before it), so
  load from other processes on a shared machine hits them alike.  Each callable gets an index and
  rotates its inputs through a pool (``pool_size``: sized to exceed twice the last-level cache,
  within limits); the index counts every call of the round-robin, so each call reads the slot
  the call ``pool`` calls before it read, whichever contender it is.  (Handing every contender
  of a round the same slot let all but the first find their inputs in cache, left by the one
  before: the first contender was charged the cold reads, up to 1.46x on the CPU.)  On a GPU,
  where a pool may still fit in L2, the L2 is flushed before every call (outside the timed
  region), by reading a buffer twice its size, so that no timed call pays for writing back the
  flush's lines; the host then waits for the flush, so that the call's own launch gaps are
  timed rather than hidden behind the flush kernel.
* Saved for backward: the unique storages that autograd packs during a forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (a tensor saved twice, or two views of one
  storage, count once).
* Peak memory (GPU only): ``torch.cuda.max_memory_allocated`` above what was allocated before.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import signal
import sys
import threading
import time
from statistics import median
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that could flatter repeated reads."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return 32 << 20


def pool_size(bytes_per_slot: int, device: torch.device, max_pool: int = 8,
              max_bytes: int = 1 << 30) -> int:
    """How many input sets to rotate through: enough to exceed twice the cache, within limits."""
    want = math.ceil(2 * cache_bytes(device) / max(bytes_per_slot, 1))
    cap = max(1, max_bytes // max(bytes_per_slot, 1))
    return int(max(2, min(want, max_pool, cap)))


class _L2Flusher:
    def __init__(self, device: torch.device):
        self.buf = torch.empty(2 * cache_bytes(device), dtype=torch.uint8, device=device)

    def __call__(self):
        self.buf.sum()  # read, not write: the lines it leaves in L2 are clean
        torch.cuda.synchronize(self.buf.device)


def measure_many(fns: Sequence[Callable[[int], object]], device: torch.device, *,
                 contexts: Optional[Sequence[Callable[[], ContextManager]]] = None,
                 pool_bytes: int = 0, flush: Optional[bool] = None, target_s: float = 0.2,
                 min_reps: int = 5, max_reps: int = 200, warmup: int = 3,
                 on_round: Optional[Callable[[int, int], None]] = None,
                 clock: Callable[[], float] = time.perf_counter) -> List[dict]:
    """Median time of each ``fns[k](i)``, the contenders interleaved: every round runs each
    one once, so a burst of load from other processes hits all of them alike and their ratios
    stay meaningful on a shared machine.  ``contexts[k]()`` is entered around each call, outside
    the timed region.  ``pool_bytes`` is the total size of the inputs the callables rotate
    through: on a GPU the L2 is flushed before every call when that is under twice the L2 size,
    unless ``flush`` says otherwise.  A callable that raises is reported with its error and left
    out of the following rounds.  Rounds: enough for about ``target_s`` per contender;
    ``on_round(r, rounds)`` is called after each (CPU only: on a GPU rounds are queued).
    ``clock``: the CPU timer (``time.thread_time`` leaves out time this thread was descheduled:
    bench/cpu_ops.py); a GPU call is timed with events.
    The index a callable gets counts every call made here (warm-up included), not the round:
    consecutive calls, of whichever contenders, read consecutive pool slots, so every call
    finds its inputs as long unused as every other (module docstring)."""
    contexts = contexts or [contextlib.nullcontext] * len(fns)
    results: List[dict] = [{"ok": True, "times": []} for _ in fns]

    calls = itertools.count()  # the index handed to the callables (see the docstring)

    def run(k, step, r):
        """``step(k, r, i)`` in contender k's context, unless k has failed; an exception marks k
        failed (with its message) and leaves it out of the rest."""
        if not results[k]["ok"]:
            return
        try:
            with contexts[k]():
                step(k, r, next(calls))
        except Exception as exc:
            results[k].update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])

    def untimed(k, r, i):
        fns[k](i)

    estimate = 0.0
    for k in range(len(fns)):
        for i in range(warmup):
            run(k, untimed, i)
        synchronize(device)
        t0 = time.perf_counter()
        run(k, untimed, warmup)
        synchronize(device)
        if results[k]["ok"]:
            estimate += time.perf_counter() - t0
    live = [k for k, r in enumerate(results) if r["ok"]]
    reps = int(min(max_reps, max(min_reps, target_s * len(live) / max(estimate, 1e-7))))
    if device.type == "cuda":
        if flush is None:
            flush = pool_bytes < 2 * cache_bytes(device)
        flusher = _L2Flusher(device) if flush else None
        events = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)] for k in live}

        def timed(k, r, i):  # queued: the events are read after the last round
            if flusher is not None:
                flusher()
            start, end = events[k][r]
            start.record()
            fns[k](i)
            end.record()
    else:
        def timed(k, r, i):
            t0 = clock()
            fns[k](i)
            results[k]["times"].append(clock() - t0)
    # Each round in its own order (seeded: runs are repeatable): a call's time depends on the
    # call before it (allocator and cache state it leaves), and a fixed order would give each
    # contender one predecessor for the whole measurement (a 13-43% bias seen on the CPU).
    order = random.Random(len(live))
    for r in range(reps):
        for k in order.sample(live, len(live)):
            run(k, timed, r)
        if on_round is not None and device.type != "cuda":
            on_round(r + 1, reps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for k in live:
            if results[k]["ok"]:
                results[k]["times"] = [s.elapsed_time(e) * 1e-3 for s, e in events[k]]
    out = []
    for res in results:
        times = res.pop("times")
        if res["ok"] and times:
            res.update(median_s=median(times), min_s=min(times), reps=len(times))
        else:
            res.update(ok=False, median_s=None, min_s=None, reps=0)
        out.append(res)
    return out


def measure(fn: Callable[[int], object], device: torch.device, **kw) -> dict:
    """``measure_many`` for one callable; raises what the callable raised."""
    res = measure_many([fn], device, **kw)[0]
    if not res["ok"]:
        raise RuntimeError(res.get("error", "measurement failed"))
    return res


def time_contenders(cases: Sequence[tuple], device: torch.device, **kw) -> List[dict]:
    """The rows of ``cases``, each ``(row, context, make)``, measured: ``make()`` builds the
    row's callable (seeded 0), run once inside ``context()``; a row whose build or first call
    raises keeps ``ok`` False and its ``error``, the others are timed interleaved
    (``measure_many(..., **kw)``) into ``ms``, ``min_ms`` and ``reps``, and every row gets
    ``ratio_native``: its ``ms`` over that of the row named by its ``native``."""
    rows, fns, contexts = [], [], []
    for row, context, make in cases:
        row = dict(row, ok=True)
        try:
            torch.manual_seed(0)
            call = make()
            with context():
                call(0)
            fns.append(call)
            contexts.append(context)
        except Exception as exc:  # a failed row; the others still run
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
    live = [r for r in rows if r["ok"]]
    for row, r in zip(live, measure_many(fns, device, contexts=contexts, **kw)):
        row["ok"] = r["ok"]
        if r["ok"]:
            row.update(ms=r["median_s"] * 1e3, min_ms=r["min_s"] * 1e3, reps=r["reps"])
        else:
            row["error"] = r.get("error")
    by_name = {r["name"]: r for r in rows if r["ok"]}
    for row in rows:
        base = by_name.get(row["native"])
        row["ratio_native"] = row["ms"] / base["ms"] if row["ok"] and base else None
    return rows


def saved_bytes(fn: Callable[[], object]) -> Dict[str, int]:
    """Unique storages (count, bytes) autograd saves for backward while ``fn()`` runs."""
    storages: Dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            storages[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return {"saved_tensors": len(storages), "saved_bytes": int(sum(storages.values()))}


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by ``fn()`` above the memory in use before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)



class Stopped(BaseException):
    """Raised by SIGTERM inside ``until_sigterm``; a BaseException, so that a measuring loop's
    ``except Exception`` (a case that fails) does not take it for a failed case."""


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM (the GPU script's per-step time limit) raises ``Stopped``
    instead of ending the process, so that the caller can still write what it measured; the
    previous handler is put back after it.  Main thread only (where Python runs signal
    handlers); elsewhere a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def until_sigterm(name: str):
    """Run the block until SIGTERM: the signal ends the block, not the process, so that a probe
    still writes the rows measured before it (one that wrote its CSV only at the end lost
    everything to its limit)."""
    try:
        with sigterm_raises():
            yield
    except Stopped:
        print(f"note: {name} stopped by SIGTERM: writing the rows measured before",
              file=sys.stderr, flush=True)
