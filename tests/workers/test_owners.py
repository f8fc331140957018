"""The compact table of peers' sessions behaves exactly like the dict it replaced, including when
digests collide on their home slot, runs wrap around the end of the table, and the table grows,
shrinks and loses a dead worker's entries."""

from __future__ import annotations

import tracemalloc

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from spoe_agent.workers.owners import OwnerTable
from tests.support.examples import examples

SLOTS = 1024
# Few distinct homes, near the end of the table, so that probe runs are long and wrap to slot 0;
# some far above the low bits, as real 60-bit digests are; 0, which is stored as 1.
HOMES = st.sampled_from([0, 1, 2, SLOTS - 2, SLOTS - 1])
DIGESTS = st.builds(lambda home, high: home + SLOTS * high, HOMES,
                    st.integers(min_value=0, max_value=40) | st.just((1 << 50) + 7))
OWNERS = st.integers(min_value=0, max_value=5)


def _norm(digest: int) -> int:
    return digest or 1


class TableMatchesDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = OwnerTable()
        self.model: dict[int, int] = {}

    @rule(digest=DIGESTS, owner=OWNERS)
    def set(self, digest: int, owner: int) -> None:
        self.table.set(digest, owner)
        self.model[_norm(digest)] = owner

    @rule(digest=DIGESTS)
    def remove(self, digest: int) -> None:
        assert self.table.remove(digest) == (self.model.pop(_norm(digest), None) is not None)

    @rule(digest=DIGESTS, owner=OWNERS)
    def remove_if(self, digest: int, owner: int) -> None:
        held = self.model.get(_norm(digest)) == owner
        assert self.table.remove_if(digest, owner) == held
        if held:
            del self.model[_norm(digest)]

    @rule(owner=OWNERS)
    def forget_owner(self, owner: int) -> None:
        gone = [digest for digest, at in self.model.items() if at == owner]
        assert self.table.forget_owner(owner) == len(gone)
        for digest in gone:
            del self.model[digest]

    @rule(owner=OWNERS, new=OWNERS)
    def retag(self, owner: int, new: int) -> None:
        moved = [digest for digest, at in self.model.items() if at == owner]
        assert self.table.retag(owner, new) == len(moved)
        for digest in moved:
            self.model[digest] = new

    @rule(count=st.integers(min_value=700, max_value=2000), owner=OWNERS)
    def many(self, count: int, owner: int) -> None:
        """Past three quarters of 1,024 slots, so the table doubles (and halves again as the
        removals below empty it)."""
        base = 1 << 40
        for k in range(count):
            self.table.set(base + k * 7919, owner)
            self.model[base + k * 7919] = owner

    @rule()
    def remove_many(self) -> None:
        for digest in [d for d in self.model if d >= 1 << 40]:
            assert self.table.remove(digest)
            del self.model[digest]

    @invariant()
    def same_contents(self) -> None:
        assert len(self.table) == len(self.model)
        for digest, owner in self.model.items():
            assert self.table.get(digest) == owner
        for home in (0, 1, 2, SLOTS - 2, SLOTS - 1):
            for high in (0, 3, 41):
                digest = home + SLOTS * high
                assert self.table.get(digest) == self.model.get(_norm(digest))


TableMatchesDict.TestCase.settings = settings(max_examples=examples(150), stateful_step_count=40,
                                               deadline=None)
test_table_matches_dict = TableMatchesDict.TestCase


def test_an_entry_costs_its_slots_and_no_object() -> None:
    """What the table costs per entry is its two arrays (the dict it replaced spent ~140 B of
    RSS per entry, docs/scaling.md), and it gives the slots back when the sessions end."""
    digests = [(k * 2654435761) & ((1 << 60) - 1) for k in range(100_000)]
    table = OwnerTable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k, digest in enumerate(digests):
            table.set(digest, k % 3)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(table) == 100_000
    assert table.slots == 1 << 18  # the first power of two that keeps it at most 3/4 full
    # The two arrays (10 B a slot, 26 B an entry at this fill) and little else: an int object
    # alone is 32 B.
    assert grown < 1.1 * 10 * table.slots, grown
    for digest in digests:
        assert table.remove(digest)
    assert len(table) == 0
    assert table.slots == 1024


def test_digests_that_share_their_low_bits_do_not_share_a_probe_run() -> None:
    """With a known hash seed, keys can be chosen whose hashes agree in their low bits: their
    slots must still spread, or every lookup would walk one run of thousands."""
    table = OwnerTable()
    digests = [(k << 30) | 12345 for k in range(1, 5001)]
    for digest in digests:
        table.set(digest, 1)
    run = longest = 0
    for slot in range(table.slots):
        run = run + 1 if table._digests[slot] else 0
        longest = max(longest, run)
    assert longest < 500, longest  # one run of 5,000 if the slot were the low bits alone
    assert all(table.get(digest) == 1 for digest in digests)
