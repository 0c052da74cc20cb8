"""fast's GPU path. Its kernels are Numba CUDA kernels, so CI checks them on the CPU with Numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1, in a subprocess: the switch must be set before numba loads). On a
machine with a GPU and CuPy the same checks run on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

HERE = Path(__file__).resolve().parent


def _run(env_extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]), **env_extra)
    out = subprocess.run([sys.executable, str(HERE / "gpu_sim_check.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_gpu_kernels_and_model_under_cuda_simulator():
    out = _run({"NUMBA_ENABLE_CUDASIM": "1"})
    assert "ok model forward" in out and "ok generate" in out
    assert out.count("ok attention") == 6 and out.count("ok query attention") == 6


def _have_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _have_gpu(), reason="no CUDA GPU with CuPy here; the simulator test covers the logic")
def test_gpu_kernels_and_model_on_device():
    out = _run({"NUMBA_ENABLE_CUDASIM": "0"})
    assert "ok generate" in out
