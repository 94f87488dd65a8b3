"""HistoryJobs: the window's history I/O runs on one thread, in order, and its outcomes come back from there."""

from __future__ import annotations

import logging
import threading

from desktop_chat.errors import HistoryError
from desktop_chat.historyjobs import HistoryJobs

WAIT = 5.0


def test_jobs_run_in_order_on_one_thread_and_report_from_it():
    jobs = HistoryJobs(name="test-history")
    seen: list[tuple[str, int, str]] = []
    finished = threading.Event()

    def job(n: int):
        return lambda: (n, threading.current_thread().name)

    def done(result):
        seen.append((*result, threading.current_thread().name))

    for n in range(20):  # submitted before start: they wait for the thread
        jobs.submit(job(n), done=done)
    jobs.start()
    jobs.submit(lambda: None, done=lambda _: finished.set())
    assert finished.wait(WAIT)
    jobs.stop()
    assert [n for n, _, _ in seen] == list(range(20))
    assert {(ran, reported) for _, ran, reported in seen} == {("test-history", "test-history")}


def test_a_chat_error_goes_to_failed_and_the_next_job_still_runs(caplog):
    jobs = HistoryJobs()
    jobs.start()
    errors: list[Exception] = []
    finished = threading.Event()

    def broken():
        raise HistoryError("disk full")

    def crashing():
        raise RuntimeError("a bug")

    jobs.submit(broken, done=lambda _: errors.append(AssertionError("done called")), failed=errors.append)
    with caplog.at_level(logging.WARNING, logger="desktop_chat.historyjobs"):
        jobs.submit(broken)  # no failed handler: logged
        jobs.submit(crashing)  # not a ChatError: logged with its traceback, the loop goes on
        jobs.submit(lambda: "ok", done=lambda _: finished.set())
        assert finished.wait(WAIT)
    jobs.stop()
    assert [str(e) for e in errors] == ["disk full"]
    assert [r.getMessage() for r in caplog.records] == ["history job failed: disk full", "history job crashed"]
    assert caplog.records[1].exc_info is not None


def test_stop_runs_what_is_queued_then_ignores_new_jobs():
    jobs = HistoryJobs()
    release = threading.Event()
    ran: list[str] = []
    jobs.submit(lambda: release.wait(WAIT))
    jobs.submit(lambda: ran.append("queued before stop"))
    jobs.start()
    release.set()
    jobs.stop(timeout=WAIT)
    jobs.submit(lambda: ran.append("after stop"))
    jobs.start()  # a stopped HistoryJobs does not start again
    assert ran == ["queued before stop"]
