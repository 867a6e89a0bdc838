"""Shared test setup. With POSTROOM_REQUIRE_ALL=1 (CI), a skipped test is a failure."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from tests.engines import s3_server  # noqa: F401  (session-scoped SeaweedFS for any test)

REQUIRE_ALL = os.environ.get("POSTROOM_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under POSTROOM_REQUIRE_ALL=1: {report.longrepr}"
