"""docs/cli.md is generated from experiments/restore.py's flags and the library's defaults."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_reference_is_current():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "cli_doc.py"),
                         "--check"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
