"""Continuous batching: every request submitted to an engine decodes in one running batch, on one thread.

Between two decode steps the scheduler's thread drops finished or cancelled requests and admits waiting
ones, up to ``max_rows`` rows in all: short prompts prefilled together (up to ``PREFILL_TOKENS`` padded
tokens a pass), a prompt longer than ``PREFILL_CHUNK`` one chunk per turn. A request joins the batch without
waiting for the others to finish, and N concurrent streams cost one decode step per token instead of N:
decoding is bound by reading the weights, and a step reads them once for every row.

The thread starts with the first request. When nothing is left to do it releases the KV cache and its hold
on the engine, and waits up to ``IDLE_S`` seconds for more work (while the engine lives) before it ends: a
request that comes in that time is served by the same thread, whose first token comes sooner than a new
thread's (on CPU a new thread builds its OpenMP pool and per-thread state again: 40 ms to a small model's
first token instead of 21, benchmarks/idle_first_token.py). Consumers read a ``Ticket``: iterate it
(blocking) from any thread, or poll it and be woken by a listener from an event loop; ``cancel()`` takes the
request out after the step in flight. An error in a step (out of memory, say) fails every request of that
step, each with the error.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Delta, Engine, _Row
    from .prefix_cache import Prefix

__all__ = ["Scheduler", "Ticket"]

log = logging.getLogger("mixtral_local")

#: how long the batch thread, with nothing left to do, waits for more work before it ends (holding neither
#: the engine nor a KV cache meanwhile; it also ends when its engine is collected)
IDLE_S = 30.0


def _delta(item: Delta | BaseException) -> Delta:
    """A ticket's item as a delta, or the error that ended the request raised."""
    if isinstance(item, BaseException):
        raise item
    return item


def _shut_down() -> RuntimeError:
    return RuntimeError("the engine's scheduler is shut down (the process is exiting)")


class Ticket:
    """One submitted request: its deltas in order, the last with a finish reason, or the error that ended it."""

    def __init__(self, row: _Row) -> None:
        self.row = row
        self._items: collections.deque[Delta | BaseException] = collections.deque()
        self._cond = threading.Condition()
        self._listener: Callable[[], None] | None = None
        self._cancelled = False

    # the scheduler's side

    def _put(self, item: Delta | BaseException) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            listener = self._listener
        if listener is not None:
            listener()

    # the consumer's side

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Take the request out of the batch (after the step in flight); idempotent, from any thread."""
        self._cancelled = True

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener()`` (from the scheduler's thread, never blocking it) after each new item."""
        with self._cond:
            self._listener = listener

    def poll(self) -> Delta | None:
        """The next delta if one is ready, else None; raises the error that ended the request."""
        with self._cond:
            item = self._items.popleft() if self._items else None
        return None if item is None else _delta(item)

    def get(self, timeout: float | None = None) -> Delta:
        """The next delta, waiting for it; ``TimeoutError`` after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise TimeoutError(f"no token within {timeout} s")
            item = self._items.popleft()
        return _delta(item)

    def __iter__(self) -> Iterator[Delta]:
        """The deltas until the finish reason; leaving the loop early cancels the request."""
        try:
            while True:
                delta = self.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            self.cancel()


class Scheduler:
    """The engine's running batch and the thread that drives it.

    At interpreter exit every scheduler stops after its step in flight (an ``atexit`` hook): a daemon thread
    still inside torch when the interpreter ends would abort the process.
    """

    def __init__(self, engine: Engine, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self._engine = weakref.ref(engine)  # the engine owns its scheduler; only a serving thread holds it
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None  # the serving thread, until it has nothing left to do
        self._last: threading.Thread | None = None  # the latest serving thread, until it has ended
        self.steps = 0  # decode steps run (for tests and benchmarks: rows per step = tokens / steps)
        #: the running batch as of the last turn: rows decoding, prompts prefilling or queued to be, rows set
        #: aside for the KV-cache bound, bytes of KV cache held (all 0 while no batch runs)
        self._running: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._closing = False
        weakref.finalize(engine, _wake, self._cond)  # a thread waiting for work ends with its engine
        _schedulers.add(self)

    def shutdown(self, timeout: float | None = None) -> None:
        """Fail every waiting and running request, and wait (up to ``timeout``) for the thread to end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # a thread waiting for work ends now
            thread = self._last  # also a thread that is over but still unwinding (freeing its KV cache)
        if thread is not None:
            thread.join(timeout)

    def load(self) -> dict[str, int]:
        """What the engine is doing, for a health check: requests decoding, prefilling (a long prompt being
        filled, or queued to be), set aside (KV-cache bound), waiting for a row; KV-cache bytes held."""
        decoding, prefilling, aside, kv_bytes = self._running
        return {"decoding": decoding, "prefilling": prefilling, "set_aside": aside, "waiting": len(self._waiting),
                "kv_cache_bytes": kv_bytes}

    def submit(self, rows: Sequence[_Row]) -> list[Ticket]:
        """Queue ``rows`` together: the serving thread takes them in one turn when the batch has room."""
        tickets = [Ticket(row) for row in rows]
        with self._cond:
            if self._closing:
                raise _shut_down()
            self._waiting.extend(tickets)
            self._cond.notify_all()  # a thread waiting for work takes them
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="mixtral-local-batch", daemon=True)
                self._thread.start()
                self._last = self._thread
        return tickets

    def _take_waiting(self, room: int, owned: dict[int, Ticket], held: list[int],
                      engine: Engine) -> list[Ticket] | None:
        """Up to ``room`` waiting tickets, in order, while the KV cache can hold them beside the rows that
        need ``held`` positions (``Engine.fits`` of ``need_ahead``); None when there is nothing to do."""
        with self._cond:
            if self._closing:
                closed = _shut_down()
                for ticket in [*self._waiting, *owned.values()]:
                    ticket._put(closed)
                self._waiting.clear()
                owned.clear()
            if not self._waiting and not owned:
                return None
            taken: list[Ticket] = []
            reach = list(held)
            while self._waiting and len(taken) < room:
                ticket = self._waiting[0]
                if not ticket.cancelled:  # a cancelled one is taken to be dropped, whatever its size
                    if not engine.fits([*reach, ticket.row.need_ahead]):
                        break  # first come, first served: it waits for rows to finish, and the later ones too
                    reach.append(ticket.row.need_ahead)
                taken.append(self._waiting.popleft())
            return taken

    def _serve(self) -> None:
        """Serve until nothing is left to do and nothing comes for ``IDLE_S`` seconds, or until shutdown."""
        while True:
            engine = self._engine()
            if engine is not None:  # else it is gone (collected while this thread waited): so is its work
                if not self._serve_batch(engine):
                    return
                del engine  # an engine nobody else holds may go while this thread waits
            with self._cond:
                if not self._cond.wait_for(lambda: self._waiting or self._closing or self._engine() is None,
                                           timeout=IDLE_S) \
                        or self._engine() is None or (self._closing and not self._waiting):
                    self._thread = None
                    return

    def _serve_batch(self, engine: Engine) -> bool:
        """One running batch, until it has nothing to do (True) or the scheduler broke (False: thread over)."""
        owned: dict[int, Ticket] = {}  # id(row) -> ticket, for every request taken and not yet over
        try:
            self._loop(engine, owned)
        except BaseException as exc:
            self._running = (0, 0, 0, 0)  # a bug or a broken device: fail everyone rather than leave them waiting
            log.exception("the batch scheduler stopped")
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
                self._thread = None
            for ticket in [*owned.values(), *waiting]:
                ticket._put(exc)
            return False
        return True

    def _loop(self, engine: Engine, owned: dict[int, Ticket]) -> None:
        """Each turn: drop cancelled requests, take waiting ones (short prompts prefilled together, long
        ones queued to be prefilled a chunk at a time), prefill one chunk of the long prompt in progress,
        and run one decode step."""
        from .engine import PREFILL_CHUNK, _Batch  # the engine module imports this one
        from .kv_cache import KVCache

        if engine.device.type == "cuda":
            torch.cuda.set_device(engine.device)
        batch = _Batch(engine, self.max_rows)
        long: collections.deque[Ticket] = collections.deque()  # taken, waiting to be filled
        aside: collections.deque[tuple[Ticket, Prefix]] = collections.deque()  # set aside for the KV-cache bound
        taken_so_far = 0

        def deliver(row: _Row, delta: Delta) -> None:
            if row.error is not None:  # its grammar failed; the row has left the batch
                fail(row, row.error)
                return
            owned[id(row)]._put(delta)
            if delta.finish_reason is not None:
                del owned[id(row)]

        def fail(row: _Row, exc: BaseException) -> None:
            owned.pop(id(row))._put(exc)

        def publish() -> None:
            cache = batch.cache
            kv_bytes = 0 if cache is None else KVCache.nbytes(engine.model.config, cache.batch, cache.length,
                                                              engine.dtype)
            self._running = (len(batch.rows), (batch.filling is not None) + len(long), len(aside), kv_bytes)

        while True:
            for row in [r for r in batch.rows if owned[id(r)].cancelled]:
                batch.drop(row)
                del owned[id(row)]
            if batch.filling is not None and owned[id(batch.filling)].cancelled:
                del owned[id(batch.filling)]
                batch.stop_filling()
            for ticket in [t for t in long if t.cancelled]:
                long.remove(ticket)
                del owned[id(ticket.row)]
            for item in [a for a in aside if a[0].cancelled]:
                aside.remove(item)
                del owned[id(item[0].row)]
            batch.slots = self.max_rows  # it may have been raised by a client sharing the engine
            held = [r.need_ahead for r in [*batch.rows, *([batch.filling] if batch.filling else []),
                                           *(t.row for t in long)]]
            while aside and batch.size + len(long) < batch.slots \
                    and engine.fits([*held, aside[0][0].row.need_ahead]):  # those set aside come back first
                ticket, saved = aside.popleft()
                batch.restore(ticket.row, saved)
                held.append(ticket.row.need_ahead)
            room = 0 if aside else self.max_rows - batch.size - len(long)  # nobody overtakes a row set aside
            taken = self._take_waiting(room, owned, held, engine)
            if taken is None:
                self._running = (0, 0, 0, 0)
                return
            short = []
            for ticket in taken:
                if ticket.cancelled:
                    continue
                taken_so_far += 1
                ticket.row.order = taken_so_far
                owned[id(ticket.row)] = ticket
                row = ticket.row
                batch.share(row)  # a long one looks again when its turn to fill comes
                (long if len(row.prompt) - row.cached > PREFILL_CHUNK else short).append(ticket)
            for row, delta in batch.admit_all([t.row for t in short], failed=fail):
                deliver(row, delta)
            if batch.filling is None and long and batch.size < batch.slots:
                batch.start_filling(long.popleft().row)
            for row, saved in batch.set_aside():  # the KV-cache bound: the latest rows wait, keys and values kept
                aside.append((owned[id(row)], saved))
            if aside:
                log.debug("KV cache bound: %d request(s) set aside until rows finish", len(aside))
            if batch.filling is not None:
                row = batch.filling
                try:
                    delta = batch.fill(PREFILL_CHUNK)  # one chunk: the others wait for a chunk, not a prompt
                except Exception as exc:
                    fail(row, exc)
                else:
                    if delta is not None:
                        deliver(row, delta)
            if not batch.rows:
                publish()
                continue
            try:
                out = batch.step()
            except Exception as exc:
                log.error("a decode step of %d rows failed: %r", len(batch.rows), exc)
                for row in batch.rows:
                    fail(row, exc)
                filling = batch.filling
                batch = _Batch(engine, self.max_rows)  # the old cache goes, and the filling row's progress
                if filling is not None:
                    long.appendleft(owned[id(filling)])
                continue
            self.steps += 1
            for row, delta in out:
                deliver(row, delta)
            publish()


_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def _wake(cond: threading.Condition) -> None:
    with cond:
        cond.notify_all()


@atexit.register
def _shutdown_all() -> None:
    for scheduler in list(_schedulers):
        scheduler.shutdown(timeout=30)
