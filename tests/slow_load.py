"""``python tests/slow_load.py ARGS...``: the ``mixtral`` command with a slowed load, for the Ctrl-C tests.

Every checkpoint tensor takes 0.2 s to read (the tiny checkpoint then loads for seconds), each read says
"reading NAME", the file's close says what closed it ("file closed by LoadCancelled"), and the process says
"exiting" at interpreter exit.
"""

import atexit
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mixtral_local.loader as loader
from mixtral_client._cli import main

real_open = loader.safe_open


def say(*words: str) -> None:
    sys.stdout.write(" ".join(words) + "\n")
    sys.stdout.flush()


class SlowOpen:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.file = real_open(*args, **kwargs)

    def __enter__(self) -> "SlowOpen":
        self.file.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        say("file closed by", type(exc[1]).__name__)
        return self.file.__exit__(*exc)

    def get_tensor(self, name: str) -> Any:
        say("reading", name)
        time.sleep(0.2)
        return self.file.get_tensor(name)


def interrupted(*args: str) -> tuple[int, float, str, str]:
    """Run ``mixtral ARGS`` with the slowed load, press Ctrl-C once the load has begun; returns the exit status,
    the seconds from Ctrl-C to the exit, and stdout (the first "reading" line taken) and stderr."""
    with subprocess.Popen([sys.executable, str(Path(__file__)), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline().startswith("reading")  # the load has begun
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
    return proc.returncode, time.monotonic() - sent, out, err


if __name__ == "__main__":
    loader.safe_open = SlowOpen  # type: ignore[assignment,misc]
    atexit.register(say, "exiting")
    sys.exit(main(sys.argv[1:]))
