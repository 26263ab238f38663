"""`make chaos` in small: three SIGKILLs of the real server under load, then the
same verification as a 100-kill run (bench/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_chaos_three_kills_lose_nothing(tmp_path: Path):
    summary = await run(3, tmp_path, seed=1, log=lambda _: None)
    assert not summary.problems, str(summary)
    assert summary.kills == 3
    # The run exercised what it verifies.
    assert summary.tasks > 0 and summary.completions > 0 and summary.failures > 0, str(summary)
