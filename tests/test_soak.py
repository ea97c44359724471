"""The soak (bench/soak.py) against the real daemon: every stream ends well, every hang-up is seen."""

from __future__ import annotations

import subprocess
import sys

from bench import soak
from bench.harness import REPO, Daemon, profile_file


def test_soak_300_streams(tmp_path, model_cache, tiny_model):
    profile = profile_file(tmp_path, "soak", engine={"queue_size": 2})
    daemon = Daemon(str(profile), model_cache, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        figures = soak.run(daemon, requests=300, clients=8, hangup_rounds=5)
    finally:
        assert daemon.stop() == 0
    ends = figures["ends"]
    # Every stream read to the end was accepted by the SDK and ended with message_stop;
    # nothing was cut off, nobody gave up waiting, and the queue did refuse some.
    assert set(ends) <= {"message_stop", "hangup"}, ends
    assert ends["message_stop"] + ends["hangup"] == 300 and ends["hangup"] > 30
    assert figures["refused_529"] > 0
    assert figures["hangups_in_log"] == {"cancelled": ends["hangup"]}
    assert figures["log_truncated"] == 0
    assert figures["engine_idle_after_s"] < 5
    out = subprocess.run(
        [sys.executable, "-m", "anyclaude", "logs", "stats", "--file", str(daemon.requests)], capture_output=True, text=True, cwd=REPO
    )
    assert "truncated         0 (0.00%)" in out.stdout
