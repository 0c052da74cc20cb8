"""fast/step.py: a cached decoding step compiled whole must give what ref's layer code gives with fast's
kernels, bit for bit, and ref's numbers within float32 rounding; everything it does not cover falls back."""

from __future__ import annotations

import gc
import json

import numba as nb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fast
import ref
from fast import cpu, step, team
from ref.config import tiny_hf_dict
from ref.layers import rope_cos_sin
from ref.model import Model
from ref.safetensors_io import Bf16
from ref.tiny import random_tensors, write_checkpoint

from helpers import cached_steps, count_step_calls


def _steps(model, run, ids, new_ids, key_ok, block) -> list[np.ndarray]:
    """Prefill ids [1, T], then one cached step per id of new_ids, each through `run` (a run_decoder) ->
    the final-normed hidden state of every step [1, 1, D] (prefill's last position first)."""
    return cached_steps(model, run, ids, key_ok, block, new_ids)[0]


configs = st.fixed_dictionaries({
    "num_hidden_layers": st.integers(2, 7), "sliding_window": st.integers(2, 9),
    "attention_k_eq_v": st.booleans(), "num_key_value_heads": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([8, 12, 16]), "use_bidirectional_attention": st.sampled_from(["vision", None]),
    "num_kv_shared_layers": st.integers(0, 2), "use_double_wide_mlp": st.booleans(),
    "final_logit_softcapping": st.sampled_from([30.0, None]), "vocab_size": st.sampled_from([512, 600]),
})


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(c=configs, length=st.integers(1, 16), pad=st.integers(0, 2), image=st.booleans(), seed=st.integers(0, 999))
def test_compiled_step_equals_the_layer_code_bit_for_bit(tmp_path_factory, monkeypatch, c, length, pad, image,
                                                         seed):
    """Every decoding step, across the sliding ring's wrap (12 steps past windows of 2-9), with KV-shared
    and k_eq_v layers, left padding and a vision block in the prompt: the compiled step's hidden state is
    ref's layer code's (with fast's kernels) bit for bit, and ref's own within 1e-5; so are the logits the
    step computes (with and without soft-capping, a vocabulary of whole and of part GEMV programs)."""
    n = c["num_hidden_layers"]  # a full layer early, so that a shared last (full) layer has a source
    c["layer_types"] = ["sliding_attention", "full_attention"] + ["sliding_attention"] * (n - 3) + ["full_attention"]
    c["layer_types"] = c["layer_types"][:n]
    c["num_kv_shared_layers"] = min(c["num_kv_shared_layers"], n - 2)
    hf = tiny_hf_dict(**c)
    d = write_checkpoint(tmp_path_factory.mktemp("m"), hf, random_tensors(hf, seed, "BF16"))
    model, peer = fast.load_model(d), ref.load_model(d)
    model.token_minor = False  # both sides prefill through the layer code: its cache is what is compared
    rng = np.random.default_rng(seed)
    T = pad + length + 1
    ids = rng.integers(3, 400, (1, T))
    key_ok = np.arange(T)[None] >= pad
    block = np.full((1, T), -1)
    if image and length >= 3:
        block[0, pad + 1:pad + 3] = 0
    new_ids = rng.integers(3, 400, 12)
    calls = count_step_calls(monkeypatch)
    fused = cached_steps(model, model.run_decoder, ids, key_ok, block, new_ids,
                         each=lambda h: _with_logits(model, h))[0]
    assert len(calls) == len(new_ids), "the compiled step did not run"
    plain = cached_steps(model, lambda *a: Model.run_decoder(model, *a), ids, key_ok, block, new_ids,
                         each=lambda h: _with_logits(model, h))[0]
    assert len(calls) == len(new_ids)
    want = _steps(peer, peer.run_decoder, ids, new_ids, key_ok, block)
    assert [f[2] for f in fused] == [False] + [True] * len(new_ids) and not any(p[2] for p in plain)
    for s, ((f, fl, _), (p, pl, _), w) in enumerate(zip(fused, plain, want)):
        assert np.array_equal(f, p), f"step {s}: compiled and layer code differ by {np.abs(f - p).max()}"
        np.testing.assert_allclose(f, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
        assert fl.tobytes() == pl.tobytes(), f"step {s}: logits differ by {np.abs(fl - pl).max()}"


def _with_logits(model, h) -> tuple:
    """h [1, 1, D] -> (h, its logits through the model's lm_head, whether they were the ones the compiled
    step computed: it had them and handed them out); taken at once, before the next step."""
    held = model._step is not None and model._step._last is not None
    logits = model.kernels.lm_head(h, model.head, model.config.final_logit_softcapping)
    return h, logits, held and model._step._last is None


def _checkpoint(tmp_path, dtype="BF16", **overrides):
    hf = tiny_hf_dict(**overrides)
    return write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 3, dtype))


def test_generate_uses_the_compiled_step_and_gives_refs_tokens(tmp_path, monkeypatch):
    d = _checkpoint(tmp_path)
    calls = count_step_calls(monkeypatch)
    ids = np.arange(3, 20)[None]
    got = fast.load_model(d).generate(ids, max_new_tokens=6)
    assert len(calls) == got.shape[1] - 1  # every token after the prefill's
    np.testing.assert_array_equal(got, ref.load_model(d).generate(ids, max_new_tokens=6))


@pytest.mark.parametrize("case", ["plain", "softcap", "eos", "suppress", "padded", "one", "untied"])
def test_greedy_decoding_of_one_sequence_runs_the_compiled_loop_with_refs_tokens(tmp_path, monkeypatch, case):
    """Greedy decoding of one sequence runs its steps in DecodeStep.greedy (embedding, layers, head and the
    choice compiled): the tokens and what on_token sees are ref.generate's, with soft-capping, an eos id that
    stops it early, suppressed ids (the ones ref would pick otherwise), left padding, one token, and an
    output table of its own."""
    over = {"final_logit_softcapping": 30.0} if case == "softcap" else {"tie_word_embeddings": False} \
        if case == "untied" else {}
    d = _checkpoint(tmp_path, **over)
    ids, n = np.arange(3, 20)[None], 1 if case == "one" else 9
    mask = (np.arange(ids.shape[1]) >= 3)[None].astype(np.int64) if case == "padded" else None
    if case in ("eos", "suppress"):
        free = ref.load_model(d).generate(ids, max_new_tokens=n)[0]
        assert free[0] != free[3]  # the eos id comes after the loop's first step
        gen = ({"eos_token_id": [int(free[3])]} if case == "eos" else
               {"suppress_tokens": sorted({int(t) for t in free[1:4]})})  # the ids ref picked there
        (d / "generation_config.json").write_text(json.dumps(gen))
    seen, want_seen = [], []
    chosen = count_step_calls(monkeypatch, "_choose")
    got = fast.load_model(d).generate(ids, max_new_tokens=n, attention_mask=mask,
                                      on_token=lambda t: seen.append(t.copy()))
    want = ref.load_model(d).generate(ids, max_new_tokens=n, attention_mask=mask,
                                      on_token=lambda t: want_seen.append(t))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype and len(seen) == len(want_seen) == want.shape[1]
    for a, b in zip(seen, want_seen):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert len(chosen) == want.shape[1] - 1, "the compiled loop did not choose every token after the first"
    if case == "eos":
        assert want.shape[1] < n and want[0, -1] == free[3]
    if case == "suppress":
        assert not set(want[0, 1:].tolist()) & set(free[1:4].tolist())


@pytest.mark.parametrize("case", ["sampled", "no_loop", "suppress_outside", "pad_outside"])
def test_what_the_compiled_loop_does_not_cover_takes_refs_loop(tmp_path, monkeypatch, case):
    """Sampling, a model told not to run the loop (greedy_loop False), a suppressed id outside the output
    table (ref's selection raises) and a pad id outside the embedding (a placeholder's row) go through
    ref's loop: its tokens, its error."""
    d = _checkpoint(tmp_path)
    if case in ("suppress_outside", "pad_outside"):
        gen = {"suppress_tokens": [100000]} if case == "suppress_outside" else {"pad_token_id": 100000}
        (d / "generation_config.json").write_text(json.dumps(gen))
    model, peer = fast.load_model(d), ref.load_model(d)
    model.greedy_loop = case != "no_loop"
    chosen = count_step_calls(monkeypatch, "_choose")
    kw = {"temperature": 0.8, "seed": 5} if case == "sampled" else {}
    ids = np.arange(3, 20)[None]
    if case == "suppress_outside":
        with pytest.raises(IndexError):
            peer.generate(ids, max_new_tokens=4)
        with pytest.raises(IndexError):
            model.generate(ids, max_new_tokens=4)
    else:
        np.testing.assert_array_equal(model.generate(ids, max_new_tokens=6, **kw),
                                      peer.generate(ids, max_new_tokens=6, **kw))
    assert not chosen


@settings(deadline=None, max_examples=60)
@given(v=st.integers(1, 300), seed=st.integers(0, 9999), specials=st.integers(0, 6), suppress=st.integers(0, 5),
       low=st.sampled_from([-2, -np.inf]))
def test_the_greedy_choice_is_refs_selection(v, seed, specials, suppress, low):
    """step._choose picks what ref.generate.select picks at temperature 0: the first of equal maxima (-0 equal
    to +0), a NaN where one is left (numpy's argmax), never a suppressed id unless all is -inf (then id 0),
    across blocks of maxima (CHOICE_BLOCK)."""
    from ref.generate import select

    rng = np.random.default_rng(seed)
    logits = rng.integers(-2, 3, v).astype(np.float32)  # small integers: ties
    if low == -np.inf:  # mostly -inf: the maximum may be -inf itself
        logits[rng.random(v) < 0.9] = -np.inf
    logits[rng.integers(0, v, specials)] = rng.choice(np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0],
                                                               np.float32), specials)
    ids = tuple(int(i) for i in rng.integers(0, v, suppress))
    held = np.zeros(v, bool)
    held[list(ids)] = True
    want = int(select(logits[None], ids, 0.0, None, None, None)[0])
    assert step._choose(logits, held) == want


@pytest.mark.parametrize("logits, suppress", [
    ([-0.0, 0.0], ()), ([-1.0, -0.0, 0.0], ()), ([0.0, -0.0], ()), ([1.0, -np.nan, np.nan], ()),
    ([1.0, np.nan, 2.0], (1,)), ([-np.inf, -np.inf], (0,)), ([5.0, -np.inf], (0,)), ([np.nan], (0,))])
def test_the_greedy_choice_on_signed_zeros_nans_and_all_minus_infinity(logits, suppress):
    """The cases a draw may miss, each against ref's selection: -0 equals +0 (the first wins), a NaN with its
    sign bit set (x86's default NaN) is still numpy's maximum, a suppressed NaN is not, and where all is
    -inf id 0 wins, suppressed or not."""
    from ref.generate import select

    x = np.array(logits, np.float32)
    held = np.zeros(x.size, bool)
    held[list(suppress)] = True
    assert step._choose(x, held) == int(select(x[None], suppress, 0.0, None, None, None)[0])


def test_the_compiled_loops_embedding_is_refs(tmp_path):
    """step._embed_token gives ref's embedding bit for bit, placeholders (image, audio, video) as pad."""
    model = fast.load_model(_checkpoint(tmp_path))
    cfg, s = model.config, step.DecodeStep(model.config, model.decoder_params, model.head)
    x = np.empty((1, cfg.hidden_size), np.float32)
    for t in [0, 1, 5, cfg.vocab_size - 1, cfg.pad_token_id, cfg.image_token_id, cfg.audio_token_id,
              cfg.video_token_id]:
        step._embed_token(t, s.table_bits, s.placeholders, cfg.pad_token_id, s.scale, x)
        assert x.tobytes() == model.embed(np.array([[t]])).reshape(1, -1).tobytes(), t


def test_the_steps_logits_go_only_to_its_own_output_and_only_once(tmp_path):
    """lm_head takes the logits the step computed only for the step's output itself (a view of its memory
    in its shape and order), the same table and cap, and once; anything else is computed by lm_head."""
    model = fast.load_model(_checkpoint(tmp_path, final_logit_softcapping=30.0))
    ids, cap = np.arange(3, 20)[None], model.config.final_logit_softcapping
    T = ids.shape[1]
    h = cached_steps(model, model.run_decoder, ids, np.ones((1, T), bool), np.full((1, T), -1), [7])[0][-1]
    want = cpu.lm_head(h.copy(), model.head, cap)  # the head's GEMV outside the step
    held = model._step
    for other in [(h.copy(), model.head, cap), (h[:, :, ::-1], model.head, cap),
                  (h, Bf16(model.head.bits.copy()), cap), (h, model.head, 20.0)]:
        assert held.logits_for(*other) is None
    got = held.logits_for(h[:, -1:], model.head, cap)
    assert got is not None and got.tobytes() == want.tobytes()
    assert held.logits_for(h, model.head, cap) is None  # handed out already


def test_the_steps_typed_lists_live_as_long_as_their_cache(tmp_path):
    """The step keeps each cache's K/V and slot arrays as typed lists while the cache lives (one set during a
    generation, built at its first step), and lets them go with it: a long cache is not held past its
    generation."""
    model = fast.load_model(_checkpoint(tmp_path))
    held = []
    model.generate(np.arange(3, 20)[None], max_new_tokens=4,
                   on_token=lambda _: held.append((len(model._step._kv_lists), len(model._step._slot_lists))))
    gc.collect()
    assert held == [(0, 0), (1, 1), (1, 1), (1, 1)]  # the greedy loop builds the step before the prefill
    assert len(model._step._kv_lists) == 0 and len(model._step._slot_lists) == 0


@pytest.mark.parametrize("rows", [step.ROPE_ROWS, 5])
def test_the_steps_rope_rows_are_refs_tables_position_by_position(tmp_path, monkeypatch, rows):
    """The RoPE rows the step fills ahead (ROPE_ROWS positions per call of ref's rope_cos_sin) equal ref's
    tables computed for each position alone, bit for bit, for both RoPE kinds (default and proportional,
    head dims 16 and 32), across refills, and after a jump back to an earlier position."""
    monkeypatch.setattr(step, "ROPE_ROWS", rows)
    model = fast.load_model(_checkpoint(tmp_path))
    s = step.DecodeStep(model.config, model.decoder_params)
    assert len(s.ropes) == 2
    for p in list(range(0, 140)) + [3, 200, 4000]:
        cos, sin = s.rope_rows(p)
        for r, inv in enumerate(s.inv_freq):
            c, si = rope_cos_sin(np.array([[p]]), inv)
            n = 2 * inv.size
            assert cos[r, :n].tobytes() == c.reshape(-1).tobytes() and sin[r, :n].tobytes() == si.reshape(-1).tobytes()


@pytest.mark.parametrize("case", ["batch", "float32", "bias", "no_cache"])
def test_what_the_compiled_step_does_not_cover_takes_the_layer_code(tmp_path, monkeypatch, case):
    """Two sequences, float32 weights, attention biases or no cache: no compiled step, and the tokens are
    still ref's."""
    d = _checkpoint(tmp_path, "F32" if case == "float32" else "BF16",
                    **({"attention_bias": True} if case == "bias" else {}))
    calls = count_step_calls(monkeypatch)
    ids = np.arange(3, 20)[None].repeat(2 if case == "batch" else 1, axis=0)
    kw = {"use_cache": False} if case == "no_cache" else {}
    got = fast.load_model(d).generate(ids, max_new_tokens=4, **kw)
    assert not calls
    np.testing.assert_array_equal(got, ref.load_model(d).generate(ids, max_new_tokens=4, **kw))


def test_compiled_step_splits_long_attention_like_the_layer_code(tmp_path, monkeypatch):
    """Heads wide enough (8 x 256) that attention over 200+ keys takes the split-key path over several
    programs, and a sliding ring (300) that wraps: still bit for bit, and the split really happened."""
    d = _checkpoint(tmp_path, num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=256,
                    sliding_window=300, num_hidden_layers=3)
    model = fast.load_model(d)
    model.token_minor = False  # both sides prefill through the layer code
    T = 260
    assert step._key_chunk(8, 256, T, 2) < T  # several programs
    rng = np.random.default_rng(1)
    ids, new_ids = rng.integers(3, 400, (1, T)), rng.integers(3, 400, 45)
    key_ok, block = np.ones((1, T), bool), np.full((1, T), -1)
    calls = count_step_calls(monkeypatch)
    fused = _steps(model, model.run_decoder, ids, new_ids, key_ok, block)
    plain = _steps(model, lambda *a: Model.run_decoder(model, *a), ids, new_ids, key_ok, block)
    assert len(calls) == len(new_ids)
    for s, (f, p) in enumerate(zip(fused, plain)):
        assert np.array_equal(f, p), f"step {s}: compiled and layer code differ by {np.abs(f - p).max()}"


@pytest.mark.skipif(nb.config.NUMBA_NUM_THREADS < 2, reason="one CPU: the step's team has one member")
def test_a_team_that_cannot_meet_runs_the_step_alone_with_the_same_numbers(tmp_path, monkeypatch):
    """The step's threads run it as one team (fast.team). Where its two iterations run one after another
    on one thread (as a task-based threading layer may run them), the first member meets nobody, does the
    whole step alone and the second does nothing: the output, the logits and the cache's new row are the
    team's bit for bit."""
    model = fast.load_model(_checkpoint(tmp_path))
    model.token_minor = False
    calls, real = [], step._layers

    def keep(*args):
        calls.append((args[0].copy(),) + args[1:])  # x as it came in (the step overwrites it)
        return real(*args)

    monkeypatch.setattr(step, "_layers", keep)
    model.generate(np.arange(3, 40)[None], max_new_tokens=3)
    x, table, mats, norms, scalars, keys, values, masks, cos, sin, eps, _, final_norm, out, head, cap, logits = \
        calls[-1]
    assert logits.size == model.config.vocab_size  # the head ran in the step
    results = []
    for threads_running in (2, 1):
        nb.set_num_threads(threads_running)
        try:
            h, o, lg = x.copy(), np.empty_like(out), np.empty_like(logits)
            roles = real(h, table, mats, norms, scalars, keys, values, masks, cos, sin, eps, 2, final_norm, o, head,
                         cap, lg)
        finally:
            nb.set_num_threads(nb.config.NUMBA_NUM_THREADS)
        results.append((roles.tolist(), h, o, lg, [k.copy() for k in keys], [v.copy() for v in values]))
    (together_roles, *together), (alone_roles, *alone) = results
    assert together_roles == [team.TEAM] * 2 and alone_roles == [team.SOLO, team.OUT]
    for a, b in zip(together, alone):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert u.tobytes() == v.tobytes()
