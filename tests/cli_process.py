"""Running the installed command line in a subprocess, as a user would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


def run_cli(*args, cwd=None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`quailora-convert ARGS` (or `python -m quailora_cli` without the console script), offline, no debug tracebacks."""
    console_script = shutil.which("quailora-convert")
    command = [console_script] if console_script else [sys.executable, "-m", "quailora_cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("QUAILORA_DEBUG", None)
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
