"""A large output file written as a pipeline: chunks converted on several threads, written in order behind the caller.

An export is a stream of chunks (a slice of a weight, transposed and converted). Done one after the
other, reading, converting and writing take turns and the job runs at the speed of one core. Here the
caller hands over each chunk as data or as a conversion still to run (a function of no arguments);
conversions run on ``threads`` workers (numpy and torch release the GIL for their copies), a writer
thread takes the results strictly in the order they were handed over, and the caller goes on reading
the next weights meanwhile. The bytes written are therefore exactly those of the serial order, whatever
the thread count.

The file is written around the page cache where the file system allows it
(:mod:`~edgellm_steps.artifacts.uncached_file`). The writer hashes what it writes (xxh3-128, far
faster than any disk), and the digest is remembered for the step's manifest
(:func:`~edgellm_steps.artifacts.digests.remember_written`): the output is never read back to be hashed.

Memory stays bounded: at most ``threads + 2`` chunks are queued or being converted; the caller
waits when the queue is full.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import xxhash

from edgellm_steps.artifacts.digests import remember_written
from edgellm_steps.artifacts.uncached_file import open_output

#: What a caller hands over: bytes-like data, or a function of no arguments returning it.
Chunk = bytes | bytearray | memoryview | np.ndarray | Callable[[], Any]
_DONE = object()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a Slurm or cgroup allotment, not the host's count)."""
    return len(os.sched_getaffinity(0))


def _as_bytes(data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data)).cast("B")
    return memoryview(data).cast("B")


class StreamedFile:
    """A file written in order by a background thread, its chunks converted on ``threads`` workers, hashed as written.

    ``threads=1`` does everything in the caller's thread, in the same order: the same bytes, no
    threads. Use as a context manager (or call :meth:`close` / :meth:`abort`): a failure in a
    conversion or a write is raised in the caller by the next :meth:`write` or by :meth:`close`.
    """

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = max(1, int(threads))
        self.bytes_written = 0
        self._hasher = xxhash.xxh3_128()
        self._handle = open_output(self.path)
        self._error: BaseException | None = None
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"convert-{self.path.name}")
            self._queue = queue.Queue(maxsize=self.threads + 2)
            self._writer = threading.Thread(target=self._write_loop, name=f"write-{self.path.name}", daemon=True)
            self._writer.start()

    def write(self, chunk: Chunk) -> None:
        """Append ``chunk`` (data, or a conversion producing it) after everything handed over before."""
        self._raise_pending()
        if self._queue is None:
            self._put(chunk() if callable(chunk) else chunk)
            return
        if callable(chunk):
            assert self._pool is not None
            chunk = self._pool.submit(chunk)
        while True:  # waits while the queue is full, but notices a failed writer
            try:
                self._queue.put(chunk, timeout=0.5)
                return
            except queue.Full:
                self._raise_pending()

    def _put(self, data: Any) -> None:
        view = _as_bytes(data)
        self._handle.write(view)
        self._hasher.update(view)
        self.bytes_written += view.nbytes

    def _write_loop(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not _DONE:
            if self._error is not None:
                if isinstance(item, Future):
                    item.cancel()
                continue  # drain, so that a caller blocked on a full queue is released
            try:
                self._put(item.result() if isinstance(item, Future) else item)
            except BaseException as err:
                self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop_threads(self) -> None:
        if self._writer is not None:
            assert self._queue is not None
            self._queue.put(_DONE)
            self._writer.join()
            self._writer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> str:
        """Write everything handed over, close the file and return (and remember) its xxh3-128 digest."""
        if self._closed:
            return self._hasher.hexdigest()
        try:
            self._stop_threads()
            self._raise_pending()
        except BaseException:
            self.abort()
            raise
        self._handle.close()
        self._closed = True
        digest = self._hasher.hexdigest()
        remember_written(self.path, digest)
        return digest

    def abort(self) -> None:
        """Stop without finishing: pending conversions are dropped, the partial file is left for its staging's owner."""
        if self._closed:
            return
        if self._error is None:
            self._error = RuntimeError(f"{self.path}: writing was aborted")
        self._stop_threads()
        self._handle.discard()
        self._closed = True

    def __enter__(self) -> StreamedFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
