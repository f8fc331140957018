"""The table of the sessions the other workers own, kept compact because every worker holds one.

Each worker knows which peer owns every session open elsewhere (docs/scaling.md), so with N
workers an open session costs its own worker its registry record and each of the N-1 others an
entry here. In a ``dict[int, int]`` that entry took ~140 B of RSS (the int object, the dict's
slot, and what its doublings leave behind; measured with four workers: 2,123-2,134 B of RSS per
open session against a 2 KiB budget, 1,997-2,019 B with this table, benchmarks/README.md).
Here it is a 64-bit slot in an ``array`` plus a 16-bit owner, at most three quarters full:
10 B per slot, 13-27 B per entry, and no object per entry at all.

Open addressing with linear probing, and deletion by backward shift rather than tombstones, so
a table that saw millions of sessions come and go probes as little as a fresh one. The keys are
the string hash of a session key cut to 60 bits (:func:`spoe_agent.workers.mesh._digest`), already
uniformly spread; the slot is its low bits with the high ones folded in and scattered, so that
keys whose hashes share their low bits (which a fixed ``PYTHONHASHSEED`` lets one aim at, and
some images set it) neither probe one run nor fill neighbouring homes into one cluster.

What it costs instead, measured in pure Python: ~0.2 us a lookup and ~1 us to add and drop an
entry (a dict: 0.03 and 0.1), so ~1-2 us per request with two workers, under 1% of a traced
request; and a pause when the table doubles, 20 ms at 49,152 entries and 35-45 ms at 98,304
(each doubling once, when open sessions reach a new high; a full garbage collection of that
many sessions' objects takes longer). Compiling it with mypyc gained nothing (``array``
indexing stays a generic call), so it is not.
"""

from __future__ import annotations

from array import array

_MIN_SLOTS = 1024
#: An odd multiplier (2^64 / golden ratio): it scatters homes that would be neighbours.
_SPREAD = 0x9E3779B97F4A7C15


def _zeros(code: str, size: int, slots: int) -> array:
    return array(code, bytes(size * slots))


class OwnerTable:
    """``digest -> owner`` for the sessions peers have open. Digests are non-negative and below
    2^62; 0 is stored as 1 (two keys then share an owner, as any two with one digest do)."""

    __slots__ = ("_digests", "_owners", "_mask", "_used")

    def __init__(self, slots: int = _MIN_SLOTS) -> None:
        size = _MIN_SLOTS
        while size < slots:
            size *= 2
        self._digests = _zeros("q", 8, size)
        self._owners = _zeros("H", 2, size)
        self._mask = size - 1
        self._used = 0

    def __len__(self) -> int:
        return self._used

    @property
    def slots(self) -> int:
        return self._mask + 1

    def _find(self, digest: int) -> int:
        """The slot that holds ``digest``, or the empty one that ends its probe run."""
        digests = self._digests
        mask = self._mask
        i = (digest ^ digest >> 30) * _SPREAD & mask
        while True:
            found = digests[i]
            if found == digest or found == 0:
                return i
            i = (i + 1) & mask

    def get(self, digest: int) -> int | None:
        """The owner of ``digest``, or None if no peer announced it."""
        i = self._find(digest or 1)
        return self._owners[i] if self._digests[i] else None

    def set(self, digest: int, owner: int) -> None:
        digest = digest or 1
        i = self._find(digest)
        self._owners[i] = owner
        if self._digests[i]:
            return
        self._digests[i] = digest
        self._used += 1
        if self._used * 4 > (self._mask + 1) * 3:
            self._resize((self._mask + 1) * 2)

    def remove(self, digest: int) -> bool:
        """Forget ``digest``; whether it was there. The entries after it in its probe run move
        back into the gap, each only as far as its own home slot allows."""
        digests = self._digests
        owners = self._owners
        mask = self._mask
        i = self._find(digest or 1)
        if digests[i] == 0:
            return False
        j = i
        while True:
            j = (j + 1) & mask
            found = digests[j]
            if found == 0:
                break
            home = (found ^ found >> 30) * _SPREAD & mask
            # The entry at j may fill the gap at i unless its home lies cyclically in (i, j].
            if (home <= i or home > j) if i < j else (j < home <= i):
                digests[i] = found
                owners[i] = owners[j]
                i = j
        digests[i] = 0
        owners[i] = 0
        self._used -= 1
        if mask + 1 > _MIN_SLOTS and self._used * 8 < mask + 1:
            self._resize((mask + 1) // 2)
        return True

    def remove_if(self, digest: int, owner: int) -> bool:
        """Forget ``digest`` if ``owner`` holds it (an *ended* from someone who no longer does
        must not drop the new owner's entry)."""
        if self.get(digest) != owner:
            return False
        return self.remove(digest)

    def retag(self, owner: int, new: int) -> int:
        """Give every entry of ``owner`` to ``new``; how many there were. (One pass over the
        slots, as :meth:`forget_owner` makes: once per worker death.)"""
        owners = self._owners
        if owner not in owners:
            return 0
        digests = self._digests
        n = 0
        for i in range(len(owners)):
            if owners[i] == owner and digests[i]:
                owners[i] = new
                n += 1
        return n

    def forget_owner(self, owner: int) -> int:
        """Drop every entry of ``owner`` (a worker that died took its sessions with it); how
        many there were."""
        owners = self._owners
        if owner not in owners:
            return 0
        before = self._used
        self._resize(self._mask + 1, without=owner)
        return before - self._used

    def _resize(self, slots: int, without: int = -1) -> None:
        old_digests = self._digests
        old_owners = self._owners
        size = max(slots, _MIN_SLOTS)
        digests = _zeros("q", 8, size)
        owners = _zeros("H", 2, size)
        mask = size - 1
        used = 0
        for k in range(len(old_digests)):
            digest = old_digests[k]
            if digest == 0:
                continue
            owner = old_owners[k]
            if owner == without:
                continue
            i = (digest ^ digest >> 30) * _SPREAD & mask
            while digests[i] != 0:
                i = (i + 1) & mask
            digests[i] = digest
            owners[i] = owner
            used += 1
        self._digests = digests
        self._owners = owners
        self._mask = mask
        self._used = used
