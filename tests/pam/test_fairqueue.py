"""authd.pam.fairqueue: who gets the next PAM worker, decided in memory."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authd.pam.fairqueue import FairQueue


def drain(queue: FairQueue[str, str]) -> list[str]:
    out = []
    while queue:
        out.append(queue.pop())
    return out


def test_a_flood_does_not_queue_ahead_of_another_uid() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for i in range(100):
        assert queue.push("flood", f"f{i}")
    queue.push("victim", "v0")
    assert queue.pop() == "f0"
    assert queue.pop() == "v0"  # not behind the other 99
    assert drain(queue) == [f"f{i}" for i in range(1, 100)]


def test_uids_take_turns_and_each_keeps_its_order() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for item in ("a1", "a2", "a3", "b1", "c1", "c2"):
        queue.push(item[0], item)
    assert drain(queue) == ["a1", "b1", "c1", "a2", "c2", "a3"]


def test_a_uid_that_comes_back_joins_the_back_of_the_turns() -> None:
    queue: FairQueue[str, str] = FairQueue()
    queue.push("a", "a1")
    queue.push("b", "b1")
    queue.push("b", "b2")
    assert queue.pop() == "a1"
    queue.push("a", "a2")  # "a" emptied its queue: it lost its place, "b" goes first
    assert drain(queue) == ["b1", "a2", "b2"]


def test_limit_refuses_past_the_bound_per_uid_only() -> None:
    queue: FairQueue[str, str] = FairQueue()
    assert [queue.push("a", f"a{i}", limit=3) for i in range(5)] == [True, True, True, False, False]
    assert queue.queued("a") == 3
    assert queue.push("b", "b0", limit=3), "another uid is not affected"
    queue.pop()
    assert queue.push("a", "a5", limit=3), "a slot freed by a pop is usable again"
    assert queue.push("a", "a6") and queue.queued("a") == 4, "no limit given: none applies"
    assert len(queue) == 5 and queue.keys() == 2


def test_remove_takes_an_item_out_wherever_it_is() -> None:
    queue: FairQueue[str, str] = FairQueue()
    for item in ("a1", "a2", "b1"):
        queue.push(item[0], item)
    assert queue.remove("a", "a2") and not queue.remove("a", "a2") and not queue.remove("z", "a1")
    assert queue.remove("b", "b1")
    assert queue.keys() == 1 and len(queue) == 1
    assert drain(queue) == ["a1"]
    with pytest.raises(IndexError):
        queue.pop()


# A random interleaving: push(key, limit), pop, or remove(key, the n-th queued item of key).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 4), st.none() | st.integers(1, 6)),
        st.tuples(st.just("pop")),
        st.tuples(st.just("remove"), st.integers(0, 4), st.integers(0, 8)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_properties(script: list[tuple]) -> None:
    """FIFO within a uid; the bound holds; and no uid starves: while an item waits with d items
    of its own uid ahead of it, every other uid is served at most d + 1 times."""
    queue: FairQueue[int, int] = FairQueue()
    waiting: dict[int, list[int]] = defaultdict(list)  # what each key has queued, in push order
    ahead: dict[int, int] = {}  # item -> items of its own key ahead of it, at push time
    served_since: dict[int, defaultdict[int, int]] = {}  # item -> key -> pops since it was pushed
    popped: dict[int, list[int]] = defaultdict(list)
    owner: dict[int, int] = {}
    names = itertools.count()
    for op in script:
        if op[0] == "push":
            _, key, limit = op
            item = next(names)
            before = queue.queued(key)
            accepted = queue.push(key, item, limit)
            assert accepted == (limit is None or before < limit)
            if accepted:
                waiting[key].append(item)
                owner[item] = key
                ahead[item] = before
                served_since[item] = defaultdict(int)
            assert queue.queued(key) == len(waiting[key])
            assert limit is None or not accepted or queue.queued(key) <= limit
        elif op[0] == "pop":
            if not queue:
                with pytest.raises(IndexError):
                    queue.pop()
                continue
            item = queue.pop()
            key = owner[item]
            assert waiting[key][0] == item, "FIFO within a key"
            waiting[key].pop(0)
            popped[key].append(item)
            del served_since[item]
            for other, counts in served_since.items():
                if owner[other] != key:
                    counts[key] += 1
                    assert counts[key] <= ahead[other] + 1, "a key was served past its turn"
        else:
            _, key, index = op
            present = index < len(waiting[key])
            item = waiting[key][index] if present else -1
            assert queue.remove(key, item) == present
            if present:
                waiting[key].remove(item)
                del served_since[item]
                for other in waiting[key][index:]:
                    ahead[other] -= 1  # one fewer ahead of those behind it
        assert len(queue) == sum(map(len, waiting.values()))
        assert queue.keys() == sum(1 for items in waiting.values() if items)
    for key, items in popped.items():
        assert items == sorted(items), "each key's items come out in the order they went in"
