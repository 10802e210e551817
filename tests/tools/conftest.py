"""The real Prometheus tools from Debian (promtool, amtool, alertmanager), installed on first use.

`scripts/install-debian-tools.sh prometheus` installs them with apt-get when missing. With CI=true a tool that is
still missing fails the test; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("promtool", "amtool", "prometheus-alertmanager")


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of promtool, amtool and prometheus-alertmanager, installing the Debian packages if needed."""
    if any(shutil.which(t) is None for t in TOOLS):
        script = REPO / "scripts" / "install-debian-tools.sh"
        result = subprocess.run([str(script), "prometheus"], capture_output=True, text=True, timeout=900)
        detail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            reason = f"{', '.join(missing)} not available after {script.name} (exit {result.returncode}): " + \
                " | ".join(detail)
            if os.environ.get("CI") == "true":
                pytest.fail(f"required in CI: {reason}")
            pytest.skip(reason)
    return {t: str(shutil.which(t)) for t in TOOLS}
