"""fast.bench still runs end to end (a smoke test with a short prompt; the figures themselves are only
meaningful on a quiet machine, see README)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")


def test_bench_runs_and_reports_every_backend(tmp_path, capsys):
    from fast import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--prompt", "16", "--decode", "2", "--repeats", "1", "--layers", "6", "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    have_torch = importlib.util.find_spec("torch") is not None
    names = {"ref (numpy)", "fast (numba, cpu)"} | ({"HF transformers f32 (cpu)", "HF transformers bf16 (cpu)"}
                                                   if have_torch else set())
    assert names <= set(rows)
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms"] > 0 for r in rows.values())
    assert "x best HF" in capsys.readouterr().out
