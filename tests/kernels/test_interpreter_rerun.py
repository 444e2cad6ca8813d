"""The interpreter tests run even when triton was imported, compiled, earlier in the same pytest run.

Triton picks interpreter or compiler when it is first imported, so a run in which another test imported
triton before ``tests/kernels/conftest.py`` could set TRITON_INTERPRET skips them in-process; this test then
runs them in a fresh process, where the conftest sets the variable in time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _plugin_options(args: list[str]) -> list[str]:
    """The outer run's ``-p NAME`` options, so the inner run loads the same plugins."""
    options = []
    for i, arg in enumerate(args):
        if arg == "-p" and i + 1 < len(args):
            options += ["-p", args[i + 1]]
        elif arg.startswith("-p") and len(arg) > 2:
            options.append(arg)
    return options


def test_interpreter_tests_pass_in_a_fresh_process(request, interpreter_ready):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU tests cover the kernels")
    if interpreter_ready:
        pytest.skip("the interpreter tests ran in this process")
    here = Path(__file__).parent
    command = [sys.executable, "-m", "pytest", str(here), "-m", "not gpu", "-q", "-p", "no:cacheprovider"]
    command += _plugin_options(list(request.config.invocation_params.args))
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=here.parents[1])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
