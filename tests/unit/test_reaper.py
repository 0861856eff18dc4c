"""What starts every terraform command: lowered CPU priority; sandboxed,
SIGINT left to terraform (bubblewrap ignores it) and no reaper process."""
import os
import subprocess
import sys

from services.executor.adapters.terraform import _REAPER, _die_with_parent

PRINT_NICENESS = [sys.executable, "-c", "import os; print(os.nice(0))"]


def test_terraform_runs_nicer_than_the_executor():
    base = os.nice(0)
    out = subprocess.run(_die_with_parent(PRINT_NICENESS, 10, False), capture_output=True, text=True, timeout=30,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == min(19, base + 10)


def test_niceness_zero_leaves_the_priority_alone():
    out = subprocess.run([sys.executable, "-S", _REAPER, str(os.getpid()), "0", *PRINT_NICENESS],
                         capture_output=True, text=True, timeout=30, start_new_session=True)
    assert int(out.stdout) == os.nice(0)


PRINT_SIGINT = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]


def test_a_sandboxed_command_starts_with_sigint_ignored_so_the_sandbox_outlives_an_interrupt():
    """bubblewrap is in the process group the interrupt goes to: ignoring it
    (inherited across exec) keeps it alive while terraform, which catches
    SIGINT whatever it started with, stops gracefully in it."""
    for sandboxed, ignored in ((True, "True"), (False, "False")):
        out = subprocess.run(_die_with_parent(PRINT_SIGINT, 0, sandboxed), capture_output=True, text=True,
                             timeout=30, start_new_session=True)
        assert out.stdout.strip() == ignored, (sandboxed, out.stdout, out.stderr)


def test_a_sandboxed_command_runs_nicer_with_no_reaper_process():
    argv = _die_with_parent(PRINT_NICENESS, 10, True)
    assert _REAPER not in argv and sys.executable == argv[-3]  # env and nice exec into the command
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True)
    assert int(out.stdout) == min(19, os.nice(0) + 10)
