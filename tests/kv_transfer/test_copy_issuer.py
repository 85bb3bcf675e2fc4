"""The copy issuer and a transfer's ledger of copies through it (the cuda_ipc writer's logic, here with a fake
device: producers are events set by the test, a copy is a list append).

Each job is issued only once its input is produced, in the order submitted; a failed wait reaches its job while the
next jobs are still served. A transfer's drain waits for every layer at the end, but once halted only for the copies
already issued: a layer still being computed is never copied."""

from __future__ import annotations

import threading

import pytest

from splitserve.kv_transfer.copy_issuer import CopyIssuer, CopyJob, LayerCopies
from splitserve.kv_transfer.errors import TransferError


def test_jobs_are_issued_in_order_each_once_its_input_is_produced():
    issuer = CopyIssuer("test copies")
    produced = [threading.Event() for _ in range(3)]
    issued: list[tuple[int, Exception | None]] = []
    all_issued = threading.Event()

    def issue(index: int, failure: Exception | None) -> None:
        issued.append((index, failure))
        if len(issued) == 3:
            all_issued.set()

    for index, event in enumerate(produced):
        issuer.submit(CopyJob(event.wait, lambda failure, index=index: issue(index, failure)))
    produced[1].set()  # the second is ready first, but is not issued before the first
    assert not all_issued.wait(0.05) and issued == []
    produced[0].set()
    produced[2].set()
    assert all_issued.wait(10)
    assert issued == [(0, None), (1, None), (2, None)]


def test_a_failed_wait_reaches_its_job_and_the_next_job_is_still_issued():
    issuer = CopyIssuer("test copies")
    outcomes: list[Exception | None] = []
    done = threading.Event()

    def broken_device() -> None:
        raise RuntimeError("an illegal memory access")

    issuer.submit(CopyJob(broken_device, outcomes.append))
    issuer.submit(CopyJob(lambda: None, lambda failure: (outcomes.append(failure), done.set())))
    assert done.wait(10)
    assert isinstance(outcomes[0], RuntimeError) and outcomes[1] is None


class FakeDevice:
    """Copies are list appends; ``synchronize`` notes which copies it found."""

    def __init__(self) -> None:
        self.copied: list[tuple[int, str]] = []
        self.synchronized: list[list[int]] = []

    def copy(self, layer: int, payload: str) -> None:
        self.copied.append((layer, payload))

    def synchronize(self) -> None:
        self.synchronized.append([layer for layer, _ in self.copied])


def _issuer_idle(issuer: CopyIssuer) -> None:
    """Returns once every job submitted to ``issuer`` before it has been handled."""
    handled = threading.Event()
    issuer.submit(CopyJob(lambda: None, lambda failure: handled.set()))
    assert handled.wait(10)


def _drain_in_thread(copies: LayerCopies) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            copies.drain()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_the_end_waits_for_every_layer_then_synchronizes():
    issuer, device = CopyIssuer("test copies"), FakeDevice()
    copies = LayerCopies(issuer, device.copy, device.synchronize)
    produced = [threading.Event(), threading.Event()]
    for layer, event in enumerate(produced):
        copies.submit(layer, event.wait, f"pages {layer}")
    produced[0].set()
    drain, errors = _drain_in_thread(copies)
    drain.join(0.1)
    assert drain.is_alive(), "the end did not wait for layer 1"
    produced[1].set()
    drain.join(10)
    assert not drain.is_alive() and errors == []
    assert device.copied == [(0, "pages 0"), (1, "pages 1")]
    assert device.synchronized == [[0, 1]] and copies.written() == [0, 1]


def test_a_halted_transfer_waits_only_for_the_copies_already_issued():
    issuer, device = CopyIssuer("test copies"), FakeDevice()
    copies = LayerCopies(issuer, device.copy, device.synchronize)
    computing = threading.Event()  # layer 1: the rest of the pass, still on the device
    copies.submit(0, lambda: None, "pages 0")
    copies.submit(1, computing.wait, "pages 1")
    _wait_until(lambda: copies.written() == [0])
    copies.halt()
    drain, errors = _drain_in_thread(copies)
    drain.join(10)
    assert not drain.is_alive(), "the stop waited for a layer still being computed"
    assert errors == [] and device.synchronized == [[0]]
    copies.submit(2, lambda: None, "pages 2")  # after the stop: never issued
    computing.set()
    _issuer_idle(issuer)
    assert device.copied == [(0, "pages 0")] and copies.written() == [0]


def test_a_layer_that_failed_fails_the_end():
    issuer, device = CopyIssuer("test copies"), FakeDevice()
    copies = LayerCopies(issuer, device.copy, device.synchronize)

    def broken_device() -> None:
        raise RuntimeError("an illegal memory access")

    copies.submit(0, broken_device, "pages 0")
    copies.submit(1, lambda: None, "pages 1")
    with pytest.raises(TransferError, match="illegal memory access"):
        copies.drain()
    assert copies.written() == [] and device.copied == []


def _wait_until(condition) -> None:
    done = threading.Event()
    for _ in range(10_000):
        if condition():
            return
        done.wait(0.001)
    raise AssertionError("never happened")
