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
    assert "ok model forward" in out and "ok generate" in out and "ok model forward text" in out
    assert "ok embed on the device" in out
    assert out.count("ok attention") == 6 and out.count("ok query attention") == 6
    assert out.count("ok dense attention") == 6 and out.count("ok apply_rope") == 2 and "ok mlp" in out
    assert "ok upload cache" in out and "ok split_rows exact" in out and out.count("ok matmul M=12") == 4
    assert out.count("ok graph step") == 7 and out.count("ok layer code") == 3 and out.count("ok step attention") == 6


def _cuda_home(tmp_path: Path) -> Path | None:
    """A CUDA_HOME in which Numba finds libNVVM, libdevice and the CUDA runtime, made of links into the test
    extra's wheels (nvidia-cuda-nvcc-cu12, nvidia-cuda-runtime-cu12), named as Numba looks for them
    (libnvvm.so.<version>: the wheel's file has no version); None without those wheels."""
    try:
        import nvidia.cuda_nvcc
        import nvidia.cuda_runtime
    except ImportError:
        return None
    nvcc, runtime = Path(list(nvidia.cuda_nvcc.__path__)[0]), Path(list(nvidia.cuda_runtime.__path__)[0])
    home = tmp_path / "cuda"
    (home / "nvvm" / "lib64").mkdir(parents=True)
    (home / "lib64").mkdir()
    (home / "nvvm" / "lib64" / "libnvvm.so.4").symlink_to(nvcc / "nvvm" / "lib64" / "libnvvm.so")
    (home / "nvvm" / "libdevice").symlink_to(nvcc / "nvvm" / "libdevice")
    for lib in (runtime / "lib").glob("libcudart.so.*"):
        (home / "lib64" / lib.name).symlink_to(lib)
    return home


def test_gpu_kernels_compile_for_the_device(tmp_path):
    """Every CUDA kernel of fast/gpu.py compiles to PTX for compute capability 9.0 (H100, H200) through
    Numba's real CUDA target, with no GPU: what the simulator, which runs kernels as Python, cannot check.
    It caught `max` of two floats in device code, which this Numba's CUDA target cannot type."""
    home = _cuda_home(tmp_path)
    if home is None:
        pytest.skip("no libNVVM: the test extra's nvidia-cuda-nvcc-cu12 and nvidia-cuda-runtime-cu12 are missing")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]), CUDA_HOME=str(home),
               NUMBA_ENABLE_CUDASIM="0")
    out = subprocess.run([sys.executable, str(HERE / "gpu_ptx_check.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("ok _") == 22, out.stdout


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
