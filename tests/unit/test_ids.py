"""Ids: 32 hex digits, never repeated, not even by a forked child that inherits a half-used buffer."""

from __future__ import annotations

import os
import re
import threading

from service.ids import new_id


def test_ids_are_32_hex_digits_and_unique_across_many_buffers() -> None:
    ids = [new_id() for _ in range(10_000)]  # about 40 refills of the buffer
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_threads_get_distinct_ids() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def draw(out: list[str]) -> None:
        out.extend(new_id() for _ in range(2_000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in results for i in out]
    assert len(set(every)) == len(every) == 8_000


def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    new_id()  # the buffer is now partly used: a child copying it would draw the same next ids
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next ids to the parent and leave at once
        os.close(read_end)
        os.write(write_end, " ".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write_end)
    parent = {new_id() for _ in range(50)}
    with os.fdopen(read_end, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    assert len(child) == 50
    assert not parent & child
