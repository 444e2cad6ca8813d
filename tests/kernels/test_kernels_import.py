"""``mixtral_local.kernels`` imports with torch alone; triton loads only when the fused kernel is asked for."""

from __future__ import annotations

import inspect
import subprocess
import sys

import torch

import mixtral_local.kernels as kernels


def test_importing_the_package_does_not_import_triton():
    code = "import sys, mixtral_local.kernels; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_every_name_in_all_resolves():
    for name in kernels.__all__:
        assert getattr(kernels, name) is not None


def test_auto_backend_off_cuda_is_the_reference():
    name, fn = kernels.resolve_moe_backend("auto", torch.device("cpu"))
    assert (name, fn) == ("torch", kernels.moe_reference)


def test_fused_kernel_has_the_reference_signature():
    from mixtral_local.kernels.fused_moe import fused_moe

    params = list(inspect.signature(fused_moe).parameters.values())
    reference = list(inspect.signature(kernels.moe_reference).parameters.values())
    assert [(p.name, p.default) for p in params[: len(reference)]] == [(p.name, p.default) for p in reference]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(reference) :])
