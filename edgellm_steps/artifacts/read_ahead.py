"""Reading a checkpoint's next tensors in the background while the caller converts the current ones.

An export asks for weights in a known order: a decoder layer's, then the next layer's. The caller
names the next layer's tensors in advance (:meth:`ReadAhead.add`); one thread reads them in file
order while the caller works, and :meth:`ReadAhead.take` hands each over when asked for. Reading
stays at most ``budget`` bytes ahead of what was taken (one tensor at least), so memory does not
grow with the size of a layer, and names never asked for are dropped two batches later.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

#: Bytes read ahead at most: enough to keep the disk busy while a few weights are converted.
READ_AHEAD_BYTES = 256 << 20


class ReadAhead:
    """A reader thread for ``read(name)``, at most ``budget`` bytes (by ``size_of(name)``) ahead of the caller."""

    def __init__(
        self, read: Callable[[str], Any], size_of: Callable[[str], int], budget: int = READ_AHEAD_BYTES
    ) -> None:
        self._read, self._size_of, self._budget = read, size_of, budget
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, Future]] = deque()
        self._batches: deque[dict[str, Future]] = deque()
        self._held = 0  # bytes read and not yet taken
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="read-ahead", daemon=True)
        self._thread.start()

    def add(self, names: list[str]) -> None:
        """Read ``names`` next, in this order; what the batch before the last still holds is dropped."""
        with self._cond:
            if len(self._batches) == 2:
                for name, future in self._batches.popleft().items():
                    self._drop(name, future)
            batch = {name: Future() for name in names}
            self._batches.append(batch)
            self._queue.extend(batch.items())
            self._cond.notify_all()

    def take(self, name: str) -> Any | None:
        """The tensor ``name`` if it was named in advance (waiting for its read), else None: read it yourself."""
        with self._cond:
            future = next((batch.pop(name) for batch in self._batches if name in batch), None)
            if future is None:
                return None
            if not future.running() and not future.done():  # not started yet: the caller reads it now
                future.cancel()
                self._cond.notify_all()
                return None
        try:
            return future.result()
        finally:
            self._release(name)

    def _drop(self, name: str, future: Future) -> None:
        """Forget ``name``: not started, it is never read; started, its bytes leave the budget once read."""
        if not future.cancel():
            future.add_done_callback(lambda _: self._release(name))

    def _release(self, name: str) -> None:
        with self._cond:
            self._held -= self._size_of(name)
            self._cond.notify_all()

    def _next(self) -> tuple[str, Future] | None:
        """The next name to read, once the budget allows it (None when closed).

        A name is only marked as being read once it fits the budget: until then :meth:`take` sees it
        pending and reads it itself, so a caller asking out of file order never waits on a read that
        waits on the caller to take something.
        """
        with self._cond:
            while not self._closed:
                if not self._queue:
                    self._cond.wait()
                    continue
                name, future = self._queue[0]
                size = self._size_of(name)
                if not future.cancelled() and self._held > 0 and self._held + size > self._budget:
                    self._cond.wait()
                    continue
                self._queue.popleft()
                if future.set_running_or_notify_cancel():  # else dropped or taken before its turn
                    self._held += size
                    return name, future
            return None

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            name, future = item
            try:
                future.set_result(self._read(name))
            except BaseException as err:
                future.set_exception(err)

    def close(self) -> None:
        """Stop reading and drop everything read ahead."""
        with self._cond:
            self._closed = True
            for batch in self._batches:
                for future in batch.values():
                    future.cancel()
            self._batches.clear()
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()
