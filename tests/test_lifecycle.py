"""Scan tracker: when a scan closes, from receiver reports alone (no sockets, no dask)."""

from stream.session.lifecycle import CLOSING, DRAIN_GRACE_S, ScanTracker
from stream.transport.protocol import Geometry

G = Geometry((4, 5), (8, 8), n_sources=2)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def reports(tracker, *items):
    for r in items:
        tracker.handle({"worker": "w0", **r})


def frames(sid, source, first, count):
    return {"kind": "frames", "scan_id": sid, "ranges": [[source, first, count]], "events": count}


def geometry(sid):
    return {"kind": "geometry", "scan_id": sid, "geometry": G.to_wire()}


def test_closes_when_every_source_ended_and_every_frame_arrived():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"), frames("a", 0, 0, 20), frames("a", 1, 0, 15),
            {"kind": "end", "scan_id": "a", "source": 0, "frames_sent": 20},
            {"kind": "end", "scan_id": "a", "source": 1, "frames_sent": 20})
    assert t.due() == []  # source 1 still owes frames 15..19
    assert t.scans["a"].missing_so_far() == 5
    reports(t, frames("a", 1, 15, 5))
    [st] = t.due()
    assert (st.scan_id, st.close_reason, st.state) == ("a", "complete", CLOSING)
    assert t.due() == []  # returned once


def test_duplicates_and_frames_received_agree_with_a_dense_count_of_random_overlapping_reports():
    """As the reports come, against the copies of every frame part counted densely."""
    import numpy as np

    rng = np.random.default_rng(5)
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"))
    copies = np.zeros((G.n_sources, G.n_frames), np.int64)
    for _ in range(60):
        source, first = int(rng.integers(0, 2)), int(rng.integers(0, G.n_frames))
        count = int(rng.integers(1, G.n_frames - first + 1))
        reports(t, frames("a", source, first, count))
        copies[source, first:first + count] += 1
        st = t.scans["a"]
        assert st.duplicates == int(np.maximum(copies - 1, 0).sum())
        assert type(st.duplicates) is int  # it goes into msgpack'd live messages
        assert st.frames_received == int((copies > 0).sum()) // G.n_sources


def test_frames_may_arrive_after_the_end_message():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"), {"kind": "end", "scan_id": "a", "source": 0, "frames_sent": 20},
            {"kind": "end", "scan_id": "a", "source": 1, "frames_sent": 20}, frames("a", 0, 0, 20))
    assert t.due() == []
    reports(t, frames("a", 1, 0, 20))
    assert [s.close_reason for s in t.due()] == ["complete"]


def test_duplicates_do_not_count_as_progress():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"), frames("a", 0, 0, 20), frames("a", 1, 0, 10), frames("a", 1, 0, 10),
            {"kind": "end", "scan_id": "a", "source": 0, "frames_sent": 20},
            {"kind": "end", "scan_id": "a", "source": 1, "frames_sent": 20})
    assert t.due() == []
    assert t.scans["a"].duplicates == 10
    assert t.scans["a"].frames_received == (20 + 10) // 2


def heartbeat(worker, empty_at, pending=()):
    return {"kind": "heartbeat", "worker": worker, "empty_at": empty_at, "pending": list(pending),
            "input_waiting": False, "scans": {}}


def test_a_scan_that_must_close_waits_until_every_live_receiver_has_drained():
    """An abort (or every end with frames missing, or the silence timeout) closes a scan only
    once each receiver says its input queue was empty DRAIN_GRACE_S after that moment and it
    holds none of the scan's messages unprocessed: frames still queued count."""
    clock = Clock()
    t = ScanTracker(timeout_s=5, clock=clock, wall=clock)
    reports(t, geometry("b"), frames("b", 0, 0, 4))
    t.handle(heartbeat("w1", 0.0))  # a second receiver, that has said nothing of "b" yet
    reports(t, {"kind": "abort", "scan_id": "b", "source": 1, "reason": "beam blanked"})
    assert t.due() == [] and t.scans["b"].settle_from == clock.t
    start = clock.t
    clock.t += DRAIN_GRACE_S + 5  # however long: no receiver has said it drained
    assert t.due() == []
    t.handle(heartbeat("w0", start + DRAIN_GRACE_S))
    t.handle(heartbeat("w1", start + DRAIN_GRACE_S, pending=["b"]))  # read, not yet processed
    assert t.due() == [] and [rv.worker for rv in t.waiting_for(t.scans["b"])] == ["w1"]
    t.handle({"worker": "w1", **frames("b", 1, 0, 4)})
    t.handle(heartbeat("w1", start + DRAIN_GRACE_S - 0.1))  # empty, but too early to prove it
    assert t.due() == []
    t.handle(heartbeat("w1", start + DRAIN_GRACE_S + 0.1))
    [st] = t.due()
    assert (st.close_reason, st.abort_reason, st.frames_received) == ("abort", "beam blanked", 4)


def test_timeout_counts_silence_of_the_sources_and_is_cancelled_by_new_frames():
    clock = Clock()
    t = ScanTracker(timeout_s=5, clock=clock, wall=clock)
    reports(t, geometry("a"), frames("a", 0, 0, 3))
    clock.t += 4.9
    t.handle(heartbeat("w0", clock.t))
    assert t.due() == [] and t.scans["a"].settle_from is None
    clock.t += 0.2
    assert t.due() == [] and t.scans["a"].settle_from == clock.t  # must close: waits for a drain
    reports(t, frames("a", 0, 3, 3))  # the source was only slow
    assert t.due() == [] and t.scans["a"].settle_from is None
    clock.t += 5.0
    t.due()
    t.handle(heartbeat("w0", clock.t + DRAIN_GRACE_S))
    [st] = t.due()
    assert st.close_reason == "timeout" and st.frames_received == 3


def test_a_silent_receiver_holds_the_scan_until_dask_removes_its_worker():
    """A stopped worker keeps its queue: the scan waits for it; when dask removes the
    worker, the frames it had processed are named lost, with the cause, and the scan closes."""
    clock = Clock()
    t = ScanTracker(timeout_s=5, clock=clock, wall=clock)
    reports(t, geometry("a"), frames("a", 0, 0, 20), frames("a", 1, 0, 10))
    t.handle({"worker": "w1", **frames("a", 1, 10, 5)})
    for source in (0, 1):
        reports(t, {"kind": "end", "scan_id": "a", "source": source, "frames_sent": 20})
    start = clock.t
    assert t.due() == []  # must close: from now on, waits for the receivers
    clock.t += 60
    t.handle(heartbeat("w0", clock.t))
    assert t.due() == [] and [rv.worker for rv in t.stalled()] == ["w1"]
    assert [st.scan_id for st in t.worker_gone("w1", "no heartbeat (stalled)")] == ["a"]
    [st] = t.due()
    assert st.close_reason == "ended" and st.lost == {"w1": "no heartbeat (stalled)"}
    assert st.settle_from == start and st.missing_so_far() == 5
    assert st.reported()[1, 10:15].all()  # reported by w1: the file names these lost


def test_frames_sent_counts_distinct_frames_and_a_larger_count_is_tolerated():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"), frames("a", 0, 0, 20), frames("a", 1, 0, 20), frames("a", 1, 3, 2),
            {"kind": "end", "scan_id": "a", "source": 0, "frames_sent": 20},
            {"kind": "end", "scan_id": "a", "source": 1, "frames_sent": 22})  # counted its re-sends
    assert [s.close_reason for s in t.due()] == ["complete"]


def timed_out(sid="a"):
    """A tracker whose scan ``sid`` (3 frames) timed out and closed; and its clock."""
    clock = Clock()
    t = ScanTracker(timeout_s=1, clock=clock, wall=clock)
    reports(t, geometry(sid), frames(sid, 0, 0, 3))
    clock.t += 2
    t.due()
    t.handle(heartbeat("w0", clock.t + 5))
    assert [st.scan_id for st in t.due()] == [sid]
    return t, clock


def test_late_rejects_are_counted_in_their_scan_with_the_frames_they_carried():
    t, _ = timed_out()
    st = t.scans["a"]
    for r in ({"reason": "late", "ranges": [[0, 3, 4]]}, {"reason": "bad_version", "ranges": []}):
        t.handle({"kind": "reject", "detail": "", "scan_id": "a", "worker": "w0", **r})
    assert st.rejects == 2 and st.reject_reasons == {"late": 1, "bad_version": 1}
    assert st.late_frames == 4 and st.late_mask()[0].nonzero()[0].tolist() == [3, 4, 5, 6]


def test_reports_that_do_not_fit_the_scan_are_counted_not_raised():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, geometry("a"), frames("a", 0, 0, 20),
            {"kind": "end", "scan_id": "a", "source": 7, "frames_sent": 20},      # no source 7
            frames("a", 3, 0, 5), frames("a", 0, 15, 10),                          # out of range
            {"kind": "geometry", "scan_id": "a", "geometry": Geometry((9, 9), (8, 8)).to_wire()})
    assert t.rejects == {"bad_header": 1, "bad_geometry": 3}
    assert t.scans["a"].frames_sent == {} and t.scans["a"].frames_received == 10
    assert "two geometries" in t.scans["a"].errors[0]


def test_late_rejects_of_forgotten_scans_do_not_open_a_scan():
    t = ScanTracker()
    t.handle({"kind": "reject", "reason": "late", "detail": "", "scan_id": "old", "worker": "w"})
    assert "old" not in t.scans and t.rejects == {"late": 1}


def test_reports_of_a_closing_scan_change_nothing():
    t, _ = timed_out()
    before = t.scans["a"].frames_received
    reports(t, frames("a", 0, 3, 5), geometry("c"))
    assert t.scans["a"].frames_received == before
    assert set(t.scans) == {"a", "c"}


def test_rejects_are_counted_by_reason():
    t = ScanTracker()
    for reason in ("not_msgpack", "late", "late"):
        t.handle({"kind": "reject", "reason": reason, "detail": "", "scan_id": None, "worker": "w"})
    assert t.rejects == {"not_msgpack": 1, "late": 2}


def test_an_end_before_the_geometry_from_a_source_that_does_not_exist():
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, {"kind": "end", "scan_id": "a", "source": 7, "frames_sent": 20})
    assert t.due() == [] and "a" not in t.scans  # it waits for the scan's start
    reports(t, geometry("a"))
    assert t.scans["a"].frames_sent == {} and t.rejects == {"bad_header": 1}


def test_an_end_that_comes_before_the_start_counts_once_the_start_comes():
    """The end of a source can reach the coordinator through another receiver before the
    start does: it waits for it."""
    t = ScanTracker(timeout_s=5, clock=Clock())
    reports(t, {"kind": "end", "scan_id": "a", "source": 0, "frames_sent": 20},
            {"kind": "end", "scan_id": "a", "source": 1, "frames_sent": 20})
    reports(t, {"kind": "start", "scan_id": "a", "source": 0, "geometry": G.to_wire(), "metadata": {}},
            frames("a", 0, 0, 20), frames("a", 1, 0, 20))
    [st] = t.due()
    assert st.close_reason == "complete" and st.frames_sent == {0: 20, 1: 20}


def test_end_and_abort_of_a_scan_nobody_announced_are_dropped_after_a_minute():
    clock = Clock()
    t = ScanTracker(timeout_s=5, clock=clock, announce_grace_s=2)
    for k in range(300):
        reports(t, {"kind": "end", "scan_id": f"junk{k}", "source": 0, "frames_sent": 3},
                {"kind": "abort", "scan_id": f"junk{k}", "source": 0, "reason": "x"})
    assert t.expire_unannounced() == 0 and t.due() == [] and t.scans == {}
    clock.t += 30  # a start may be late behind a busy receiver's backlog: they still wait
    assert t.expire_unannounced() == 0
    clock.t += 31
    assert t.expire_unannounced() == 600 and t.rejects == {"unannounced": 600}
    reports(t, geometry("junk1"))  # a start after the grace opens a new scan, without the old end
    assert t.scans["junk1"].frames_sent == {}


def test_forgotten_scans_are_never_reopened():
    clock = Clock()
    t = ScanTracker(timeout_s=1, clock=clock, wall=clock)
    for sid in ("a", "b"):
        reports(t, geometry(sid))
    clock.t += 2
    t.due()
    t.handle(heartbeat("w0", clock.t + 5))
    for st in t.due():
        st.state = "done"
    t.forget_done(keep=1)
    assert set(t.scans) == {"b"}
    for report in ({"kind": "reject", "reason": "operator_error", "detail": "x", "scan_id": "a"},
                   frames("a", 0, 0, 3), geometry("a")):
        t.handle({"worker": "w", **report})
    assert set(t.scans) == {"b"}


def test_a_reject_that_reaches_the_coordinator_before_its_scan_opened_still_counts_in_it():
    """Receivers report independently: one may reject a message naming scan "a" before
    another receiver's report opens "a". Such rejects are kept (bounded) and counted in "a"."""
    t = ScanTracker(timeout_s=5, clock=Clock())
    t.handle({"kind": "reject", "reason": "bad_version", "detail": "", "scan_id": "a", "worker": "w1"})
    t.handle({"kind": "reject", "reason": "not_msgpack", "detail": "", "scan_id": None, "worker": "w1"})
    assert "a" not in t.scans
    reports(t, geometry("a"))
    assert t.scans["a"].rejects == 1 and t.scans["a"].reject_reasons == {"bad_version": 1}
    assert t.rejects == {"bad_version": 1, "not_msgpack": 1}
