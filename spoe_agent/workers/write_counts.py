"""How many times each worker has written to each other, in memory every worker maps.

Before it handles a read of NOTIFYs a worker must take in everything its peers wrote to it
(docs/scaling.md, "Keeping each stream's order"), and finding out that they wrote nothing took a
``poll`` system call per read: with two workers and one busy HAProxy connection, the worker
serving it paid ~8 of them per traced request for nothing, since its peer had nothing to send.
Each writer now also counts its writes here, after the kernel has the bytes and so before the
ACK that lets HAProxy send the stream's next event; a reader whose counts have not moved since
its last drain began knows there is nothing to drain, for the price of a memory read.

One count per (writer, reader) pair, each written by one process only, so no lock is needed:
a reader that reads a count while it is being written sees either value, and the write it
might miss was not yet one that an ACK could depend on. The counts live in a file of the
agent's private runtime directory, so a restarted worker goes on from where its predecessor
stopped (a count never goes back, which is what a reader compares against).
"""

from __future__ import annotations

import mmap
import os

_NAME = "write-counts"
_SLOT = 8  # bytes: one signed 64-bit count


class WriteCounts:
    """The counts of worker ``index`` among ``workers``: it bumps its own column and reads
    its own row (the writes to it)."""

    def __init__(self, runtime_dir: str, workers: int, index: int) -> None:
        size = workers * workers * _SLOT
        fd = os.open(os.path.join(runtime_dir, _NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zeros; the same size again if a peer raced us here
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._counts = memoryview(self._map).cast("q")
        self._workers = workers
        self._index = index
        self._row = slice(index * workers, (index + 1) * workers)

    def wrote(self, reader: int) -> None:
        """This worker's bytes to ``reader`` are in the kernel: count them."""
        self._counts[reader * self._workers + self._index] += 1

    def written_to_me(self) -> int:
        """All writes to this worker so far; it only ever grows."""
        return sum(self._counts[self._row])
