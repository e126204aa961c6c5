"""The soak of issue 9 in CI: benchmarks/soak.py for 25 seconds (its default is 60; 25 keeps
the suite short), with every fault it injects, must pass its own checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
SECONDS = 25


def test_soak_with_faults(tmp_path: Path) -> None:
    """
    Mixed sessions on a twistd vncmux with backends killed, clients vanishing and tokens
    revoked: no error of any reason, every byte verified, no session or descriptor left
    behind, no traceback in the proxy's log, and memory within bounds.
    """
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", str(SECONDS), "--workers", "8",
         "--kill-interval", "3", "--seed", "9", "--json-out", str(out)],
        capture_output=True,
        timeout=SECONDS + 90,
    )  # fmt: skip
    assert out.exists(), run.stderr.decode(errors="replace")[-3000:]
    result = json.loads(out.read_text())
    summary = json.dumps(result, indent=1)
    assert run.returncode == 0 and result["passed"], summary
    assert result["errors"] == {}, summary
    assert result["outcomes"]["ok"] > 50, summary
    for fault in ("backend_killed", "client_vanished", "token_revoked"):
        assert result["faults"][fault] >= 1, summary
    assert result["bytes_verified"] > 10 * 2**20, summary
    assert result["sessions_left_open"] == 0, summary
    assert result["proxy_fds"]["more_at_end"] == {}, summary
    assert result["proxy_rss_kib"]["growth"] < 32 * 1024, summary
