"""fast.bench still runs end to end (a smoke test with a short prompt; the figures themselves are only
meaningful on a quiet machine, see README)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("numba", reason="the fast extra (numba) is not installed")


def _tool(name: str):
    """tools/<name>.py as a module."""
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_reports_every_backend(tmp_path, capsys):
    from fast import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--prompt", "16", "--decode", "2", "--repeats", "2", "--layers", "6", "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(len(r["prefill_rounds_s"]) == 2 for r in rows.values())  # one timed call per backend a round
    # the table's prefill is the best round's
    assert all(r["prefill_tok_s"] == pytest.approx(16 / min(r["prefill_rounds_s"])) for r in rows.values())
    have_torch = importlib.util.find_spec("torch") is not None
    names = {"ref (numpy)", "fast (numba, cpu)"} | ({"HF transformers f32 (cpu)", "HF transformers bf16 (cpu)"}
                                                   if have_torch else set())
    assert names <= set(rows)
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms"] > 0 for r in rows.values())
    # each CPU row's bandwidth limit is the best reading, its own weight buffers' among them
    assert all(r["read_gbs"] >= r["own_read_gbs"] > 0 for r in rows.values() if r["cpu"])
    printed = capsys.readouterr().out
    assert "x best HF" in printed
    if have_torch:  # each round's prefill ratio against the fastest HF mode, under the table
        line = next(x for x in printed.splitlines() if x.strip().startswith("fast (numba, cpu)") and "." in x
                    and len(x.split()) == 5)
        hf = max((r for r in rows.values() if r["backend"].startswith("HF")), key=lambda r: r["prefill_tok_s"])
        want = [h / f for h, f in zip(hf["prefill_rounds_s"], rows["fast (numba, cpu)"]["prefill_rounds_s"])]
        assert [float(x) for x in line.split()[3:]] == pytest.approx(want, abs=0.006)
    assert [f.name for f in tmp_path.iterdir()] == ["bench.json"]  # written whole: no partial file left


def test_measure_interleaves_the_backends_round_by_round():
    """Each round calls every backend once, in the given order in even rounds and reversed in odd ones; each
    backend's prefill is its calls' first-token times, its decode gaps those of all its calls; the limits
    are read for each CPU backend before the first round and after the last, and every CPU backend is set
    against the best peak and bandwidth of all those readings, its own buffers' speed beside them."""
    from fast import bench

    calls, clock = [], [0.0]

    def backend(name, first, gap):
        def once():
            calls.append(name)
            t0 = clock[0]
            clock[0] += 10
            return t0, [t0 + first, t0 + first + gap, t0 + first + 3 * gap]
        return once

    readings = iter([(1.0, 5.0, 2.0), (3.0, 1.0, 4.0), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0)])
    read = []

    def limits(buffers):
        read.append((buffers[0], len(calls)))
        return next(readings)

    runners = [bench.Runner("a", backend("a", 1.0, 0.5), 2, ["A"]), bench.Runner("b", backend("b", 2.0, 0.25), 4, ["B"]),
               bench.Runner("gpu", backend("gpu", 0.5, 0.125), 2)]
    got = bench.measure(runners, 3, limits=limits, settle=0)
    assert calls == ["a", "b", "gpu", "gpu", "b", "a", "a", "b", "gpu"]
    assert read == [("A", 0), ("B", 0), ("A", 9), ("B", 9)]  # before the first call and after the last
    # readings (peak, bw, own): a (1, 5, 2) then (2, 2, 2), b (3, 1, 4) then (1, 1, 1). The run's best peak is
    # b's 3 and its best bandwidth a's 5, for both rows; own stays each backend's best: a 2, b 4.
    assert got["a"] == ([1.0] * 3, [0.5, 1.0] * 3, (3.0, 5.0, 2.0))
    assert got["b"] == ([2.0] * 3, [0.25, 0.5] * 3, (3.0, 5.0, 4.0))
    assert got["gpu"] == ([0.5] * 3, [0.125, 0.25] * 3, None)


def test_measure_refuses_a_call_without_two_tokens():
    from fast import bench

    runner = bench.Runner("short", lambda: (0.0, [1.0]), 2)
    with pytest.raises(RuntimeError, match="short: the run produced 1 tokens"):
        bench.measure([runner], 1, settle=0)


@pytest.mark.parametrize("argv, says", [
    (["--skip", "hf-f32,bogus"], "no backend named bogus"),
    (["--decode", "0"], "must be at least 1"),
    (["--repeats", "-2"], "must be at least 1"),
    (["--layers", "two"], "invalid positive_int value"),
    (["--prompt", "4000", "--decode", "96"], "need 4097 positions"),
    (["--json", "{tmp}/no/such/folder/bench.json"], "is not a folder"),
])
def test_bench_refuses_a_bad_command_line_in_one_line_before_it_runs(tmp_path, capsys, argv, says):
    """Status 2 and one line on stderr naming the problem, before anything is measured (nothing on stdout,
    where the run's first line would be) and nothing written."""
    from fast import bench

    assert bench.main([a.format(tmp=tmp_path) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err
    assert not any(tmp_path.iterdir())


def test_estimate_12b_times_every_layer_and_the_head(tmp_path):
    """tools/estimate_12b.py's measuring step on a tiny checkpoint (the tool itself writes 3 GB)."""
    import ref
    from ref.config import tiny_hf_dict
    from ref.tiny import random_tensors, write_checkpoint

    tool = _tool("estimate_12b")
    hf = tiny_hf_dict()
    path = write_checkpoint(tmp_path / "ckpt", hf, random_tensors(hf))
    model = ref.load_model(path)
    r = tool.run_steps(model, prompt=40, decode=3)
    for phase in ("prefill", "decode"):
        per_layer, head = r[phase]
        assert len(per_layer) == len(model.config.layers) and all(t > 0 for t in per_layer) and head > 0


def test_estimate_12b_runs_end_to_end_with_its_limits(monkeypatch, capsys):
    """The whole tool, with the 12B's sizes replaced by the tiny config's (the real ones write 3 GB):
    every backend's two phases are printed, each against a limit read as fast.bench reads it."""
    from ref.config import tiny_hf_dict

    tool = _tool("estimate_12b")
    monkeypatch.setattr(tool, "gemma4_12b_hf_dict", tiny_hf_dict)
    assert tool.main(["--prompt", "30", "--decode", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "fast, mapped", "fast, copied"):
        assert f"--backend {name} prefill" in out and f"--backend {name} decode" in out
    assert out.count("GFLOP/s") >= 3 and out.count("GB/s") >= 3


def test_profile_fast_runs_end_to_end(monkeypatch, capsys):
    """The whole tool on the tiny config instead of the bench model: both tables and the bandwidth line."""
    from fast import bench
    from ref.config import tiny_hf_dict

    # the tiny sizes with the bench's vocabulary (its prompt's ids reach 30000; the media ids follow it)
    monkeypatch.setattr(bench, "bench_config", lambda layers: tiny_hf_dict(vocab_size=bench.BENCH_VOCAB))
    assert _tool("profile_fast").main(["--prompt", "16", "--decode", "2", "--stages"]) == 0
    out = capsys.readouterr().out
    assert "prefill, 16 tokens" in out and "decode, per token" in out and "over the model's own weights" in out
    assert "the compiled step by stage" in out and all(f"  {name} " in out for name in _tool("profile_fast").STAGES)


def test_the_stage_profile_names_every_barrier_and_keeps_the_tokens(tmp_path):
    """tools/profile_fast.py --stages on a tiny bf16 model with KV-shared layers (which skip the K/V row's
    barrier) and a soft-capped head: the stamped copy of the step meets exactly the barriers `stage_names`
    lists (it raises otherwise), decodes ref's tokens, and its stages fit in the step's call, their openings
    in them; the real step is back afterwards."""
    import fast
    import ref
    from fast import step
    from ref.config import tiny_hf_dict
    from ref.tiny import random_tensors, write_checkpoint

    tool = _tool("profile_fast")
    hf = tiny_hf_dict(num_hidden_layers=4, num_kv_shared_layers=2, final_logit_softcapping=30.0,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    d = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, dtype="BF16"))
    model, real, ids = fast.load_model(d), step._layers, np.arange(3, 40)[None]
    seen = []
    generate = model.generate
    model.generate = lambda *a, **k: seen.append(generate(*a, **k)) or seen[-1]
    r = tool.stage_profile(model, ids, n_decode=3)
    assert step._layers is real
    assert "K/V row" not in tool.stage_names(model._step.table[2:], head=False)  # the shared layers
    np.testing.assert_array_equal(seen[-1], ref.load_model(d).generate(ids, max_new_tokens=4))
    assert set(r["stages"]) == set(tool.STAGES) and all(v > 0 for v in r["stages"].values())
    assert sum(r["stages"].values()) <= r["step"] <= r["token"]
    assert all(0 <= r["openings"][n] <= r["stages"][n] for n in tool.STAGES) and r["waits"] >= 0


def test_profile_fast_accounts_for_every_timed_function(tmp_path):
    """tools/profile_fast.py on a tiny bf16 model: the own times of the timed functions are positive and add
    up to no more than the phase they were measured in; prefill runs token-minor (fast/prefill.py's functions
    around the BLAS products and the upcast) or, as layer code, the same products with their transposes and
    fast's kernels; decode runs the compiled step once per token, or (layer code) the GEMV and the split-key
    attention, each with the calls one step makes. The functions are unwrapped afterwards."""
    import fast
    from fast import cpu, prefill, step
    from ref.config import tiny_hf_dict
    from ref.tiny import random_tensors, write_checkpoint

    tool = _tool("profile_fast")
    def wrapped():
        return ({name: getattr(cpu, name) for name in tool.ROWS} |
                {n: getattr(step, n) for n in ("_layers", "_embed_token", "_choose")} | {"_run": step.DecodeStep._run} |
                {name: getattr(prefill, name) for name in tool.PREFILL_ROWS})

    originals = wrapped()

    hf = tiny_hf_dict()
    model = fast.load_model(write_checkpoint(tmp_path / "m", hf, random_tensors(hf, dtype="BF16")))
    whole = tool.profile(model, np.arange(3, 40)[None], n_decode=4, repeats=1)
    model.whole_step = model.token_minor = False
    r = tool.profile(model, np.arange(3, 40)[None], n_decode=4, repeats=1)
    assert originals == wrapped(), "the functions were not unwrapped"
    total, rows = whole["prefill"]
    must = {"matmul_t", "matmuls_t", "_upcast_rows", "transpose", "norm_t", "head_norm_rope_t", "residual_t",
            "attention_t", "softmax_t"}
    assert must <= set(rows) and "rms_norm" not in rows and sum(own for _, own in rows.values()) <= total
    assert rows["residual_t"][0] == 2 * len(model.config.layers)
    total, rows = whole["decode"]
    assert all(rows[n][0] == 1 for n in ("_layers", "DecodeStep._run", "_embed_token", "_choose"))  # a token:
    # one step, one embedding, one choice in the greedy loop
    assert "decode_attention" not in rows and sum(own for _, own in rows.values()) <= total
    layers = len(model.config.layers)
    for phase, must in (("prefill", {"matmul_t", "transpose", "_upcast_rows", "tiled_attention", "rms_norm"}),
                        ("decode", {"_gemv", "decode_attention", "rms_norm"})):
        total, rows = r[phase]
        assert must <= set(rows) and all(own > 0 for _, own in rows.values()), (phase, rows)
        assert sum(own for _, own in rows.values()) <= total
        assert rows["rms_norm"][0] >= 2 * layers  # at least the two norms around attention, per layer
    assert r["decode"][1]["decode_attention"][0] == layers  # one call per layer and token
    assert "rest" in tool.table("decode", *r["decode"])


def test_profile_timers_count_a_function_without_the_timed_functions_it_calls():
    import time

    timers = _tool("profile_fast").Timers()
    timers.on = True
    inner = timers.wrap("inner", lambda: time.sleep(0.02))
    timers.wrap("outer", lambda: (time.sleep(0.01), inner()))()
    assert 0.01 <= timers.own["outer"] < 0.02 <= timers.own["inner"]  # outer's own: its 10 ms, not 30
    assert timers.calls == {"outer": 1, "inner": 1}


def _two_layer_config():
    from ref.config import tiny_hf_dict

    return tiny_hf_dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                        global_head_dim=16, sliding_window=3, layer_types=["sliding_attention", "full_attention"])


def test_attention_flops_count_only_visible_pairs():
    """Derived by hand: 4 tokens, window 3. The sliding first layer sees 1+2+3+3 = 9 pairs; the full last
    layer, whose query side a prefill for generation runs on the last token alone, 4 (that token's keys);
    each pair costs 2 products x 2 FLOPs x head_dim per query head."""
    from fast.bench import attention_flops

    assert attention_flops(_two_layer_config(), 4) == 2 * 2 * 8 * 2 * 9 + 2 * 2 * 16 * 2 * 4


def test_prefill_flops_run_the_last_layers_query_side_on_one_token():
    """Derived by hand from the tiny config's sizes (hidden 64, MLP 96, vocabulary 512, 2 query heads on 1
    kv head; the full layer's heads 16 wide and k_eq_v, so no v_proj), 4 tokens:
    layer 0, every matrix on 4 tokens: q 16x64 + o 64x16 + k 8x64 + v 8x64 + gate, up, down 3 x 96x64
    = 1024 + 1024 + 512 + 512 + 18432 = 21504 weights;
    layer 1, k 16x64 = 1024 on 4 tokens, q 32x64 + o 64x32 + the MLP = 2048 + 2048 + 18432 = 22528 on one;
    the head 512x64 = 32768 on one; 2 FLOPs a weight and token; attention as the test above."""
    from fast.bench import attention_flops, prefill_flops, prefill_rows

    hf = _two_layer_config()
    want = 2 * (21504 * 4 + 1024 * 4 + 22528 + 32768) + 2 * 2 * 8 * 2 * 9 + 2 * 2 * 16 * 2 * 4
    assert prefill_flops(hf, 4) == want == 291904
    assert attention_flops(hf, 4) == 1088
    layer = "model.language_model.layers.{}.{}.weight"
    assert [prefill_rows(layer.format(i, n), hf, 4) for i in (0, 1) for n in ("self_attn.q_proj", "self_attn.k_proj",
            "self_attn.o_proj", "mlp.down_proj")] == [4, 4, 4, 4, 1, 4, 1, 1]
    # every layer whole (what tools/estimate_12b.py times): layer 1's 22528 on 4 tokens, 4 + 3 + 2 + 1 = 10
    # pairs in its attention
    assert prefill_flops(hf, 4, last_only=False) == \
        2 * (21504 * 4 + 1024 * 4 + 22528 * 4 + 32768) + 2 * 2 * 8 * 2 * 9 + 2 * 2 * 16 * 2 * 10


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 1000])
def test_read_probe_sums_every_element(rows):
    """The bandwidth probe must read every row (a probe that skipped some would report a bandwidth the
    memory does not have): its sum equals numpy's."""
    import numpy as np

    from fast.cpu import read_all

    a = np.random.default_rng(rows).random((rows, 37), dtype=np.float32)
    assert np.isclose(read_all(a), a.sum(dtype=np.float64), rtol=1e-5)


@pytest.mark.parametrize("sizes", [[1], [7, 1], [0, 5, 0], [3, 0, 11, 5, 40]])
@pytest.mark.parametrize("task", [1, 4, 5, 1 << 18])
def test_word_reader_sums_every_word_of_every_buffer(sizes, task):
    """The reader over a backend's own weight buffers must touch every word of every buffer once: its
    wrapping uint64 sum equals numpy's over the same words, with tasks that end inside a buffer, on a
    buffer's edge, or span several buffers, empty ones among them."""
    from numba.typed import List

    from fast.cpu import read_words

    rng = np.random.default_rng(len(sizes))
    words = [rng.integers(0, 2**63, n, dtype=np.uint64) for n in sizes]
    want = np.uint64(sum(int(w.sum(dtype=np.uint64)) for w in words) % 2**64)
    assert read_words(List(words), task) == want


def test_part_of_finds_the_part_that_holds_an_index():
    """The search both the GEMV's programs and the word reader's tasks use, against a brute force over
    parts of every size, empty ones included."""
    from fast.cpu import part_of

    first = np.array([0, 0, 3, 3, 4, 9], np.int64)  # parts 0 and 2 are empty
    for i in range(first[-1]):
        assert part_of(first, i) == next(k for k in range(len(first) - 1) if first[k] <= i < first[k + 1])


@pytest.mark.parametrize("shift", range(8))
def test_aligned_words_cover_a_buffer_but_its_unaligned_ends(shift):
    """A buffer seen as the 8-byte words that lie wholly inside it, wherever it starts: the words are
    the buffer's own bytes (a view, not a copy), and fewer than 8 bytes are left over at each end."""
    from fast.bench import aligned_words

    raw = np.arange(1000, dtype=np.uint8)
    a = raw[shift:shift + 901].view(np.uint8)
    w = aligned_words(a)
    assert w.dtype == np.uint64 and w.ctypes.data % 8 == 0 and np.shares_memory(w, a)
    lead = w.ctypes.data - a.ctypes.data
    assert 0 <= lead < 8 and 0 <= a.nbytes - lead - w.nbytes < 8
    assert w.view(np.uint8).tobytes() == a[lead:lead + w.nbytes].tobytes()


def test_weight_buffers_are_the_decodes_own_bytes(tmp_path):
    """The bytes the bench reads for 'own' are the arrays a decoded token streams: for ref and fast the
    checkpoint's bf16 matrices and the head table as loaded (the same memory), as many bytes as the
    bench's weight count at 2 bytes each."""
    import fast
    import ref
    from fast import bench
    from ref.config import tiny_hf_dict

    hf = tiny_hf_dict()
    path = bench.write_bench_checkpoint(tmp_path, hf)
    weights, _ = bench.decoder_weight_counts(hf)
    for model in (ref.load_model(path), fast.load_model(path)):
        buffers = bench.own_weight_buffers(model, hf)
        assert sum(b.nbytes for b in buffers) == 2 * weights
        head = model.tensors["model.language_model.embed_tokens.weight"].bits
        assert any(np.shares_memory(b, head) for b in buffers)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_weight_buffers_are_its_parameters_bytes(tmp_path, dtype):
    """For HF the bench reads its model's own parameters (upcast to float32 or kept in bf16), the tied
    head once: the bench's weight count at 4 or 2 bytes each, in the parameters' memory."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    from transformers import Gemma4UnifiedForConditionalGeneration

    from fast import bench
    from ref.config import tiny_hf_dict

    hf = tiny_hf_dict()
    path = bench.write_bench_checkpoint(tmp_path, hf)
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    buffers = bench.own_weight_buffers(model, hf)
    weights, _ = bench.decoder_weight_counts(hf)
    assert sum(b.nbytes for b in buffers) == weights * (4 if dtype == "float32" else 2)
    q = model.get_parameter("model.language_model.layers.0.self_attn.q_proj.weight")
    assert any(b.ctypes.data == q.data_ptr() for b in buffers)


def test_gemv_breakdown_products_and_report(capsys):
    """tools/gemv_breakdown.py: its per-matrix loop gives each matrix's product (against float64 over the exact
    values of the bits), and a one-layer run prints a line per round and the medians of its phase."""
    from numba.typed import List

    from ref.safetensors_io import bf16_to_f32, f32_to_bf16

    tool = _tool("gemv_breakdown")
    rng = np.random.default_rng(3)
    mats = [f32_to_bf16(rng.normal(size=shape).astype(np.float32)) for shape in [(40, 1024), (17, 2048), (8, 4096)]]
    xs = List([rng.normal(size=(1, 1024 * k)).astype(np.float32) for k in range(1, 5)])
    for m in mats:
        out = np.full((1, 64), np.nan, np.float32)
        tool.gemv_each(List([m]), xs, out)
        want = xs[m.shape[1] // 1024 - 1].astype(np.float64) @ bf16_to_f32(m).T
        np.testing.assert_allclose(out[:, :m.shape[0]], want, rtol=1e-5, atol=1e-4)
        assert np.isnan(out[:, m.shape[0]:]).all()
    assert tool.main(["--rounds", "2", "--repeats", "1", "--layers", "1", "--probe-mb", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("6 matrices")  # one global layer, whose v is k's projection: q, k, o, gate, up, down
    assert len([ln for ln in lines if ln.startswith("one_matrix=")]) == 2
    assert lines[-1].startswith("medians, ") and "python_calls=" in lines[-1]
