"""fast/vectors.py: 512-bit vectors asked of Numba on an AVX-512 CPU, before it compiles anything, and
never over the user's or Numba's own choice."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")

ROOT = Path(__file__).parents[1]


def _features_after(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter (numba not yet imported), then report Numba's CPU settings, its
    host features, and fast.WIDE_VECTORS where fast was imported."""
    report = ("import json, sys; from numba.core import config; from numba.core.codegen import get_host_cpu_features;"
              "f = sys.modules.get('fast');"
              "print(json.dumps({'features': config.CPU_FEATURES, 'host': get_host_cpu_features(),"
              " 'wide': getattr(f, 'WIDE_VECTORS', None)}))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    out = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, check=True,
                         env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_wide_features_only_where_the_host_has_avx512():
    from fast.vectors import wide_features

    assert wide_features("+avx2,+avx512f,-amx-tile") == "+avx2,+avx512f,-amx-tile,-prefer-256-bit"
    assert wide_features("+avx2,-avx512f,+fma") is None  # listed, but absent
    assert wide_features("+avx2,+avx512fp16x") is None  # another feature's name is not the foundation
    assert wide_features("") is None  # not x86, or LLVM could not say


def test_importing_fast_sets_the_features_before_numba_compiles():
    """A fresh process: importing fast leaves Numba's features as wide_features of its host (the host's
    own where it has no AVX-512, None: Numba's default), and a kernel compiled then uses them."""
    from fast.vectors import wide_features

    got = _features_after("import fast.cpu")
    want = wide_features(got["host"])
    assert got["features"] == want and got["wide"] == (want is not None)


@pytest.mark.parametrize("code, env, features", [
    ("import numba\n@numba.njit\ndef f(x): return x\nimport fast", {}, None),  # Numba's target set up first
    ("import fast", {"NUMBA_CPU_FEATURES": "+sse2"}, "+sse2"),  # the user's features
    ("import fast", {"NUMBA_CPU_NAME": "generic"}, ""),  # the user's CPU (Numba then asks for no features)
])
def test_importing_fast_keeps_a_choice_made_before_it(code, env, features):
    got = _features_after(code, **env)
    assert got["wide"] is False and got["features"] == features


_AXPB = """
import numba as nb
@nb.njit(fastmath=True)
def axpb(x, out, a, b):
    for i in range(x.size):
        out[i] = x[i] * a + b
axpb.compile("(float32[::1], float32[::1], float32, float32)")  # compiled, never run: any x86-64 host will do
asm = axpb.inspect_asm(axpb.signatures[0])
print("zmm" in asm, "ymm" in asm)
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="LLVM's Intel CPU models (icelake-server, skylake-avx512) exist only for an x86-64 "
                           "target; this machine is not one")
@pytest.mark.parametrize("cpu_name", ["icelake-server", "skylake-avx512"])
def test_the_wide_features_give_512_bit_code_where_llvm_would_use_256(cpu_name):
    """Compiled for an Intel AVX-512 CPU (only compiled, so on any x86-64 host): with the host's features
    as Numba has them, LLVM's tuning keeps a vectorised loop in 256-bit ymm registers; with
    `wide_features` of them, in 512-bit zmm ones. And where this process widened its own features (an
    AVX-512 host), a kernel compiled here holds zmm registers too."""
    from fast.vectors import wide_features

    def registers(features):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
        out = subprocess.run([sys.executable, "-c", _AXPB], capture_output=True, text=True, check=True,
                             env={**clean, "NUMBA_CPU_NAME": cpu_name, "NUMBA_CPU_FEATURES": features})
        return tuple(x == "True" for x in out.stdout.split())

    assert registers("+avx512f") == (False, True)  # LLVM's own choice: ymm only
    assert registers(wide_features("+avx512f")) == (True, True)

    import numba as nb
    import numpy as np

    import fast
    from fast.cpu import FM, exp32

    @nb.njit(fastmath=FM, error_model="numpy")
    def exps(x, out):
        for i in range(x.size):
            out[i] = exp32(x[i])

    x = -np.arange(64, dtype=np.float32)
    exps(x, out := np.empty_like(x))
    np.testing.assert_allclose(out, np.exp(x), rtol=1e-6)
    assert ("zmm" in exps.inspect_asm(exps.signatures[0])) == fast.WIDE_VECTORS
