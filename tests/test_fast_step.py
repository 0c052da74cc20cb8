"""fast/step.py: a cached decoding step compiled whole must give what ref's layer code gives with fast's
kernels, bit for bit, and ref's numbers within float32 rounding; everything it does not cover falls back."""

from __future__ import annotations

import gc

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
                   on_token=lambda _: held.append(0 if model._step is None else
                                                  (len(model._step._kv_lists), len(model._step._slot_lists))))
    gc.collect()
    assert held == [0, (1, 1), (1, 1), (1, 1)]
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
