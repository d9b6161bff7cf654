"""Fixtures shared by the tests.

`ringd` starts a master for a test and stops it when the test ends, however
it ends. Inside a test, `with Ringd(...) as r:` gives the same guarantee for
one block; use the fixture where the master must outlive a block, or where a
test signals or kills it itself.
"""
from __future__ import annotations

import pytest

from harness import Ringd


@pytest.fixture
def ringd(tmp_path):
    """ringd(body, sub=None, start=True, wait=True, **options of harness.Ringd)
    -> Ringd in tmp_path (or tmp_path/sub), started unless start=False (and
    ready unless wait=False). At teardown each one is stopped: SIGTERM, then
    SIGKILL, and no worker of it is left."""
    made: list[Ringd] = []

    def make(body: str, *, sub: str | None = None, start: bool = True, wait: bool = True,
             **options) -> Ringd:
        r = Ringd(tmp_path / sub if sub else tmp_path, body, **options)
        made.append(r)
        if start:
            r.start(wait=wait)
        return r

    yield make
    for r in reversed(made):
        r.stop()
