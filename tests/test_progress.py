"""tokenizers_svc.progress: the log lines long work writes outside a terminal (counts, rate, ETA)."""

from __future__ import annotations

import io

from tokenizers_svc.progress import Progress


def test_progress_lines_count_rate_and_eta():
    """Outside a terminal: a line at most every interval and one when done, with count, rate, ETA."""
    stream = io.StringIO()
    progress = Progress("eval", 4, "item", stream=stream, interval_s=0)
    progress.started -= 10  # as if 10 s had passed
    progress.update(2)
    progress.update(2)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("eval: 2/4 items (50%), 0.20 item/s, ETA 10 s")
    assert lines[1].startswith("eval: 4/4 items (100%)")
    unknown = Progress("batch-encode", None, "row", stream=stream, interval_s=3600)
    unknown.update(5)  # within the interval and no total: silent
    assert stream.getvalue().count("\n") == 2 and "5 rows" in unknown.line()


def test_progress_of_a_resumed_run_counts_files_and_items():
    """The evaluation's progress: files (2 done before this run, so not in the rate) and the items cut
    from them, each with its rate in this run."""
    stream = io.StringIO()
    progress = Progress("eval", 10, "file", stream=stream, interval_s=0, initial=2, also="item")
    progress.update(4, also=12)
    assert stream.getvalue().startswith("eval: 6/10 files (60%), ")  # not a terminal: a log line
    two_seconds_in = progress.started + 2
    assert (
        progress.line(two_seconds_in)
        == "eval: 6/10 files (60%), 2.00 file/s, 12 items (6.00 item/s), ETA 2 s"
    )
