"""The compact table of peers' sessions behaves exactly like the dict it replaced, including when
digests collide on their home slot, runs wrap around the end of the table, and the table grows,
shrinks and loses a dead worker's entries."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from spoe_agent.workers.owners import OwnerTable

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


TableMatchesDict.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                               deadline=None)
test_table_matches_dict = TableMatchesDict.TestCase


def test_memory_is_slots_not_objects() -> None:
    """What the table costs per entry is its two arrays: no object per entry (the dict it
    replaced spent ~140 B of RSS per entry, docs/scaling.md), and it gives the slots back when
    the sessions end."""
    table = OwnerTable()
    for k in range(100_000):
        table.set((k * 2654435761) & ((1 << 60) - 1), k % 3)
    assert len(table) == 100_000
    assert table.slots == 1 << 18  # the first power of two that keeps it at most 3/4 full
    size = table._digests.itemsize + table._owners.itemsize
    assert size * table.slots / len(table) < 27
    for k in range(100_000):
        assert table.remove((k * 2654435761) & ((1 << 60) - 1))
    assert len(table) == 0
    assert table.slots == 1024
