"""The measured figures in README.md and docs/benchmarks.md are generated from the records."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_are_generated_from_the_records():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_report.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout
