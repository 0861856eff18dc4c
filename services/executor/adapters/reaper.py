"""Runs one terraform command so that it cannot outlive the executor.

Started by the executor as the leader of a new process group: it asks the
kernel for SIGTERM when its parent (the executor) dies, starts terraform in its
own group, and on that SIGTERM kills the whole group: terraform, its provider
plugins and whatever a local-exec started. Without it, a killed executor would
leave a run going that the next attempt of the job would race with. The
executor's own SIGINT (cancel, timeout) goes to the whole group; the reaper
ignores it and waits for terraform to stop gracefully.

It also lowers the command's CPU priority (nice): module code is untrusted
and CPU-hungry, and must not starve the platform's own processes on the same
machine (the hops that dispatch the next step of a workflow).

Usage: python -S reaper.py <executor pid> <niceness> <command...>; exits with
the command's exit code (128 + signal when it was killed)."""
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def main() -> int:
    parent = int(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the executor died before the line above
        os.killpg(0, signal.SIGKILL)
    niceness = int(sys.argv[2])
    if niceness:
        os.nice(niceness)  # inherited by terraform, its providers and local-exec commands
    child = subprocess.Popen(sys.argv[3:], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
