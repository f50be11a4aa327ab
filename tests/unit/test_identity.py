"""Ids of new requests: unique, of the W3C sizes, and never shared with a fork."""

from __future__ import annotations

import os

from sidecar.pipeline.identity import new_ids


def test_each_request_gets_ids_of_its_own_of_the_w3c_sizes() -> None:
    drawn = [new_ids() for _ in range(100)]  # several batches of digits
    assert {tuple(map(len, ids)) for ids in drawn} == {(32, 32, 16)}
    every = [part for ids in drawn for part in ids]
    assert len(set(every)) == len(every)
    assert all(int(part, 16) >= 0 for part in every)


def test_a_forked_worker_never_hands_out_its_parents_next_ids() -> None:
    new_ids()  # the parent holds digits for its next requests
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(writer, "".join(new_ids()).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        childs = pipe.read().decode()
    os.waitpid(child, 0)
    assert len(childs) == 80
    assert childs != "".join(new_ids())
