"""The reaper that starts every terraform command: lowered CPU priority."""
import os
import subprocess
import sys

from services.executor.adapters.terraform import _REAPER, _die_with_parent

PRINT_NICENESS = [sys.executable, "-c", "import os; print(os.nice(0))"]


def test_terraform_runs_nicer_than_the_executor():
    base = os.nice(0)
    out = subprocess.run(_die_with_parent(PRINT_NICENESS, 10), capture_output=True, text=True, timeout=30,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == min(19, base + 10)


def test_niceness_zero_leaves_the_priority_alone():
    out = subprocess.run([sys.executable, "-S", _REAPER, str(os.getpid()), "0", *PRINT_NICENESS],
                         capture_output=True, text=True, timeout=30, start_new_session=True)
    assert int(out.stdout) == os.nice(0)
