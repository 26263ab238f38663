"""Server-made ids: RFC 9562 version 7 UUIDs, unique, growing with time."""

from __future__ import annotations

import os
import time
import uuid

from opscore.ids import new_id, new_token


def test_ids_are_version_7_uuids_in_canonical_form() -> None:
    for value in (new_id() for _ in range(1000)):
        parsed = uuid.UUID(value)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value  # lower-case, dashed: as uuid4 ids were


def test_ids_are_unique_across_buffer_refills() -> None:
    ids = [new_id() for _ in range(20_000)]  # about 50 refills of the random buffer
    assert len(set(ids)) == len(ids)


def test_ids_carry_their_millisecond_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_id()
    while time.time_ns() // 1_000_000 == before:  # the next millisecond
        pass
    second = new_id()
    assert uuid.UUID(first).int >> 80 >= before
    assert second > first  # later milliseconds sort later, as text too


def test_a_forked_child_does_not_repeat_the_parents_random_bits() -> None:
    new_id()  # the buffer is filled and partly used in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id, then out without running pytest's teardown
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_id()
    mask = (1 << 62) - 1  # the random bits below the variant
    assert uuid.UUID(child).int & mask != uuid.UUID(parent).int & mask


def test_tokens_are_32_hex_digits_and_unique() -> None:
    tokens = [new_token() for _ in range(10_000)]
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)
    assert len(set(tokens)) == len(tokens)
