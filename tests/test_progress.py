"""kosmos.progress: the bar and the heartbeat show on a terminal only, never when turned off."""

import sys
import time

from kosmos.progress import bar, heartbeat
from tests.helpers import Terminal


def test_bar_and_heartbeat_show_on_a_terminal_only(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(bar(range(3), desc="counting", unit=" things")) == [0, 1, 2]
    with heartbeat("waiting", every=0.02):
        time.sleep(0.3)
    out = term.getvalue()
    assert "counting" in out and "3/3" in out and "waiting ... 0 s" in out
    term.seek(0), term.truncate()
    list(bar(range(3), desc="counting", enabled=False))
    with heartbeat("waiting", enabled=False, every=0.02):
        time.sleep(0.1)
    assert term.getvalue() == ""
    plain = Terminal()
    plain.isatty = lambda: False  # a log file or a pipe
    monkeypatch.setattr(sys, "stderr", plain)
    list(bar(range(3), desc="counting"))
    with heartbeat("waiting", every=0.02):
        time.sleep(0.1)
    assert plain.getvalue() == ""
