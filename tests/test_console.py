"""How the entry points end on a scheduler's SIGTERM (curate.console.stop_cleanly_on_sigterm), in real processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAMS = {
    # a SIGTERM landing in a finalizer: Python drops the exit raised there and the command ran on to exit 0
    "swallowed by a weakref callback": """
import os, signal, time, weakref
from curate.console import stop_cleanly_on_sigterm
with stop_cleanly_on_sigterm():
    class Big: pass
    def callback(_):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))
    big = Big(); ref = weakref.ref(big, callback); del big
    time.sleep(3)
    print("ran on")
""",
    # a DataLoader worker's death (SIGCHLD, PyTorch's handler) pending with the SIGTERM: the handler set SIGCHLD to
    # its default, and Python then raised "OSError: Signal 17 ignored due to race condition" while unwinding
    "with a child's death pending": """
import os, signal
from curate.console import stop_cleanly_on_sigterm
signal.signal(signal.SIGCHLD, lambda *_: None)
with stop_cleanly_on_sigterm():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    os.kill(os.getpid(), signal.SIGCHLD)
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})  # both handled: SIGTERM first
    finally:
        sum(range(10))
""",
    # an import's class body turns the exit into a RuntimeError: exit 1 with a traceback
    "turned into another error": """
import os, signal, time
from curate.console import stop_cleanly_on_sigterm
with stop_cleanly_on_sigterm():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)
    except SystemExit as exit_:
        raise RuntimeError("Error calling __set_name__") from exit_
""",
}


@pytest.mark.parametrize("case", PROGRAMS)
def test_a_sigterm_ends_with_its_status_and_no_traceback(case):
    done = subprocess.run([sys.executable, "-c", PROGRAMS[case]], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (143, "", "")


def test_after_the_command_a_sigterm_ends_the_process_as_by_default():
    program = """
import os, signal
from curate.console import stop_cleanly_on_sigterm
with stop_cleanly_on_sigterm():
    pass
os.kill(os.getpid(), signal.SIGTERM)
print("ran on")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (-15, "")
