"""[ring] entries: the whole documented range (8..32768) starts, and a ring
that cannot be set up says which keys shaped it."""
from __future__ import annotations

import errno

import pytest

from harness import Backend, Ringd, duplex, free_ports, listener, upstream
from ringd.config import loads
from ringd.native import Event, lib, setup_failure


@pytest.mark.parametrize("entries", [8, 32768])
@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_ring_entries_at_both_ends_of_the_range_start_and_forward(tmp_path, entries, sqpoll):
    """32768 used to fail io_uring_setup with EINVAL: the CQ, sized four
    times the SQ, was past the kernel's cap."""
    bport, port = free_ports(2)
    conf = (f"[ring]\nentries = {entries}\nsqpoll = {str(sqpoll).lower()}\n"
            + listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("duplex", [bport]), Ringd(tmp_path, conf, workers=1) as r:
        assert [w["ring"] for w in r.status()["workers"]] == [
            "sqpoll" if sqpoll else "defer_taskrun"]
        duplex(port, 300000, 200000)
        assert not r.events("worker_setup_failed")
        r.assert_no_traceback()


def _config(entries: int):
    return loads(f"[ring]\nentries = {entries}\nsqpoll = false\n"
                 + listener("web", 9000, "app") + upstream("app", ["127.0.0.1:9001"]))


@pytest.mark.parametrize("err, hint", [(errno.EINVAL, "smaller ring.entries"),
                                       (errno.ENOMEM, "LimitMEMLOCK")])
def test_ring_setup_failure_names_the_keys(err, hint):
    ev = Event(lib.RINGD_EV_SETUP_FAILED, err, 2, 0, 0)
    reason = setup_failure(ev, _config(16384))
    assert reason.startswith("io_uring_setup failed: " + errno.errorcode[err])
    assert "ring.entries = 16384" in reason and "ring.sqpoll = false" in reason
    assert hint in reason


def test_other_setup_failures_keep_their_step():
    ev = Event(lib.RINGD_EV_SETUP_FAILED, errno.ENOMEM, 1, 0, 0)
    assert setup_failure(ev, _config(4096)) == (
        "allocating connection table failed: ENOMEM: Cannot allocate memory")
