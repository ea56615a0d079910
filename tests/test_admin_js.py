"""The client package's stream client (`client/aiStream.js`, served to the admin page as
`/static/aiStream.js`), unit-tested in Node's built-in test runner (`tests/js/`); this runs them
as part of the suite."""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.conftest import tool_required
from tests.process import ROOT


def test_ai_stream_js_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        tool_required("node")
        return
    done = subprocess.run(
        [node, "--test", "--test-reporter=tap", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    tap_passed(done, 30)


def tap_passed(done: subprocess.CompletedProcess[str], at_least: int) -> None:
    """Node's test runner (`--test-reporter=tap`) exited 0, reporting no failure and at least
    `at_least` passed tests."""
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    passed = re.search(r"^# pass (\d+)$", report, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", report, re.MULTILINE)
    assert passed is not None, report
    assert failed is not None, report
    assert int(failed.group(1)) == 0, report
    assert int(passed.group(1)) >= at_least, report
