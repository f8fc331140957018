"""The write counts workers share (spoe_agent/workers/write_counts.py)."""

from __future__ import annotations

from pathlib import Path

from spoe_agent.workers.write_counts import WriteCounts


def test_each_worker_reads_the_writes_to_it_and_a_replacement_counts_on(tmp_path: Path) -> None:
    workers = [WriteCounts(str(tmp_path), 3, index) for index in range(3)]
    assert [w.written_to_me() for w in workers] == [0, 0, 0]
    workers[1].wrote(0)
    workers[2].wrote(0)
    workers[0].wrote(2)
    assert [w.written_to_me() for w in workers] == [2, 0, 1]
    # Worker 1 restarts: the file is there already, its counts go on from where they were.
    replacement = WriteCounts(str(tmp_path), 3, 1)
    assert replacement.written_to_me() == 0
    replacement.wrote(0)
    assert workers[0].written_to_me() == 3
