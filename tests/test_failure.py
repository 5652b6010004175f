"""The one line a failed command prints, and the one-line console (raylm/failure.py), as plain functions."""

from __future__ import annotations

import logging

import pytest

from raylm import failure


def test_describe_names_stage_step_file_and_log():
    with pytest.raises(OSError) as caught:
        with failure.stage("curate"), failure.step("write rejected"):
            with failure.step("inner"):
                pass  # a step that ended normally is not named
            open("/nonexistent/dir/file.parquet", "rb")
    line = failure.describe(caught.value, "pipeline")
    assert line.startswith("raylm: curate failed in step 'write rejected': FileNotFoundError: ")
    assert "/nonexistent/dir/file.parquet" in line


def test_describe_reads_the_user_error_from_a_remote_traceback_text():
    class FakeRemote(Exception):  # stands for the text Ray keeps of a worker's exception chain
        pass

    FakeRemote.__module__ = "ray.exceptions"
    text = ("ray::Map(fn)\nTraceback (most recent call last):\nModuleNotFoundError: No module named 'langid'\n\n"
            "ImportError: data.quality.languages needs the `langid` package\n")
    line = failure.describe(FakeRemote(text), "curate")
    assert line == "raylm: curate failed: ImportError: data.quality.languages needs the `langid` package"


def test_one_line_formatter_keeps_tracebacks_out_of_the_console():
    formatter = failure.OneLineFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        raise ValueError("deep")
    except ValueError:
        record = logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "task failed:\nTraceback ...", None,
                                   __import__("sys").exc_info())
    assert formatter.format(record) == "ERROR task failed: [...]"
    assert "Traceback" in logging.Formatter().format(record)  # the run log's formatter still gets it all


def test_a_finished_step_says_its_time_and_what_it_handled(caplog):
    with caplog.at_level(logging.INFO, logger="raylm"):
        with failure.stage("curate"), failure.step("near dedup") as shown:
            shown.update(rows=12345, bytes=3_000_000)
        with failure.stage("tokenize"), failure.step("pack train") as shown:
            shown.update(rows=10, tokens=50_000)
        with failure.stage("curate"), failure.step("accounting"):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("curate: near dedup done in ") and ": 12,345 rows, 3.0 MB at " in lines[0]
    assert lines[0].endswith(" MB/s")
    assert ": 10 rows, 50,000 tokens at " in lines[1] and lines[1].endswith(" tokens/s")
    assert lines[2].endswith(" s")  # nothing handled to report: the time only
    assert failure.throughput({"bytes": 2e6}, 4.0) == ": 2.0 MB at 0.50 MB/s"
