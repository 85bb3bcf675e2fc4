"""The copy issuer: each job is issued only once its input is produced, in the order submitted, and a job whose
wait failed is told why (its writer then fails the transfer) while the jobs after it are still served."""

from __future__ import annotations

import threading

from splitserve.kv_transfer.copy_issuer import CopyIssuer, CopyJob


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
