"""Scan tracker: when a scan closes, from receiver reports alone (no sockets, no dask)."""

from stream.session.lifecycle import CLOSING, ScanTracker
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


def test_timeout_after_silence_and_abort_after_a_short_grace():
    clock = Clock()
    t = ScanTracker(timeout_s=5, clock=clock, wall=clock)
    reports(t, geometry("a"), frames("a", 0, 0, 3), geometry("b"),
            {"kind": "abort", "scan_id": "b", "source": 1, "reason": "beam blanked"})
    assert t.due() == []  # frames already queued in other receivers may still come
    clock.t += 0.5
    reports(t, frames("b", 0, 0, 4))
    clock.t += 0.9
    assert t.due() == []
    clock.t += 0.2
    assert [(s.scan_id, s.close_reason) for s in t.due()] == [("b", "abort")]
    assert t.scans["b"].abort_reason == "beam blanked" and t.scans["b"].frames_received == 2
    clock.t += 3.3
    assert t.due() == []
    clock.t += 0.2
    assert [(s.scan_id, s.close_reason) for s in t.due()] == [("a", "timeout")]


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
    clock = Clock()
    t = ScanTracker(timeout_s=1, clock=clock)
    reports(t, geometry("a"), frames("a", 0, 0, 3))
    clock.t += 2
    t.due()
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
    t = ScanTracker(timeout_s=1, clock=clock)
    for sid in ("a", "b"):
        reports(t, geometry(sid))
    clock.t += 2
    for st in t.due():
        st.state = "done"
    t.forget_done(keep=1)
    assert set(t.scans) == {"b"}
    for report in ({"kind": "reject", "reason": "operator_error", "detail": "x", "scan_id": "a"},
                   frames("a", 0, 0, 3), geometry("a")):
        t.handle({"worker": "w", **report})
    assert set(t.scans) == {"b"}
