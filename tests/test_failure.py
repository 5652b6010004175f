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
