"""The handle table that predicts OpenSSH's SFTP handles, against a model of sftp-server's."""

from __future__ import annotations

import random

import pytest

from runicorn.transport.sftp_pipeline import HandleTable
from runicorn.transport.sftp_protocol import FX_FAILURE, FX_OK, FXP_HANDLE, FXP_STATUS, U32


class SftpServerHandles:
    """sftp-server.c's table: free slots on a stack, a new slot past the highest when empty."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.size = 0
        self.open: set[int] = set()

    def open_file(self, fails: bool) -> int | None:
        if fails:
            return None
        slot = self.free.pop() if self.free else self.size
        self.size = max(self.size, slot + 1)
        self.open.add(slot)
        return slot

    def close(self, slot: int) -> bool:
        if slot not in self.open:
            return False
        self.open.discard(slot)
        self.free.append(slot)
        return True


def _handle_answer(request_id: int, slot: int) -> tuple[int, memoryview]:
    return FXP_HANDLE, memoryview(U32.pack(request_id) + U32.pack(4) + slot.to_bytes(4, "big"))


def _status_answer(request_id: int, code: int) -> tuple[int, memoryview]:
    return FXP_STATUS, memoryview(U32.pack(request_id) + U32.pack(code) + U32.pack(0) * 2)


@pytest.mark.parametrize("seed", range(20))
def test_predictions_follow_the_server_through_failures_and_reuse(seed: int) -> None:
    rng = random.Random(seed)
    server = SftpServerHandles()
    table = HandleTable()
    # id, kind, slot, whether it will fail (OPEN) / whether it must be guessed right (OPEN)
    in_flight: list[tuple[int, str, int | None, bool, bool]] = []
    held: list[int] = []  # slots the client knows are open (OPEN answered)
    next_id = 1
    right = 0
    for _ in range(400):
        if in_flight and (rng.random() < 0.45 or len(in_flight) > 20):
            # The server handles the oldest request and its answer arrives.
            request_id, kind, slot, fails, sure = in_flight.pop(0)
            if kind == "open":
                got = server.open_file(fails)
                answer = (
                    _handle_answer(request_id, got)
                    if got is not None
                    else _status_answer(request_id, FX_FAILURE)
                )
                if got is not None:
                    held.append(got)
                    assert slot == got or not sure
                    right += slot == got
            else:
                assert slot is not None
                ok = server.close(slot)
                answer = _status_answer(request_id, FX_OK if ok else FX_FAILURE)
            table.answered(request_id, *answer)
        elif held and rng.random() < 0.5:
            slot = held.pop(rng.randrange(len(held)))
            table.sent_close(next_id, U32.pack(4) + slot.to_bytes(4, "big"))
            in_flight.append((next_id, "close", slot, False, False))
            next_id += 1
        else:
            guess = table.sent_open(next_id)
            predicted = int.from_bytes(guess, "big") if guess is not None else None
            # Right for sure unless an OPEN sent before it and still unanswered will fail.
            sure = not any(kind == "open" and fails for _, kind, _, fails, _ in in_flight)
            in_flight.append((next_id, "open", predicted, rng.random() < 0.1, sure))
            next_id += 1
    assert not table.broken
    assert right > 50


def test_a_close_of_a_handle_it_never_saw_open_stops_the_predictions() -> None:
    table = HandleTable()
    table.sent_close(1, U32.pack(4) + (7).to_bytes(4, "big"))
    table.answered(1, *_status_answer(1, FX_OK))
    assert table.broken and table.sent_open(2) is None


def test_an_open_answered_with_a_foreign_handle_stops_the_predictions() -> None:
    table = HandleTable()
    assert table.sent_open(1) == bytes(4)
    table.answered(1, FXP_HANDLE, memoryview(U32.pack(1) + U32.pack(2) + b"ab"))
    assert table.broken
