"""Token selection: sampling options, suppress_tokens, eos and padding of finished rows."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import ref
from ref.config import tiny_hf_dict
from ref.generate import select
from ref.tiny import random_tensors, write_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = tiny_hf_dict()
    return ref.load_model(write_checkpoint(tmp_path_factory.mktemp("m"), hf, random_tensors(hf, 3)))


PROMPT = np.array([[2, 17, 43, 99, 150, 7, 7, 301]])


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=8)
    assert np.array_equal(model.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_k=1, seed=1), greedy)
    assert np.array_equal(model.generate(PROMPT, max_new_tokens=8, temperature=0.8, top_p=1e-6, seed=1), greedy)


def test_seed_makes_sampling_reproducible(model):
    a = model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=5)
    b = model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=5)
    c = model.generate(PROMPT, max_new_tokens=12, temperature=1.5, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_select_respects_top_k_top_p_and_suppression():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    draws = {int(select(logits, (), 1.0, 2, None, rng)[0]) for _ in range(200)}
    assert draws == {0, 1}  # top-2 only, both seen in 200 draws
    # top_p 0.7: tokens 0 (0.5) and 1 (0.3) are needed to reach 0.7; 2 and 3 never drawn
    draws = {int(select(logits, (), 1.0, None, 0.7, rng)[0]) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(select(logits, (0,), 1.0, None, None, rng)[0]) for _ in range(200)}
    assert 0 not in draws
    assert int(select(logits, (0, 1), 0.0, None, None, rng)[0]) == 2


def test_finished_rows_are_padded_and_generation_stops(tmp_path):
    hf = tiny_hf_dict()
    path = write_checkpoint(tmp_path / "m", hf, random_tensors(hf, 3))
    batch = np.array([PROMPT[0], PROMPT[0][::-1]])
    free = ref.load_model(path).generate(batch, max_new_tokens=6)
    stop = int(free[0, 1])  # row 0's second token becomes an eos id
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    got = ref.load_model(path).generate(batch, max_new_tokens=6)
    row0_end = int(np.argmax(free[0] == stop))
    np.testing.assert_array_equal(got[0, : row0_end + 1], free[0, : row0_end + 1])
    assert (got[0, row0_end + 1:] == 0).all()  # pad after eos
    if stop not in free[1]:
        np.testing.assert_array_equal(got[1], free[1])  # the other row runs on to max_new_tokens


def test_positions_past_the_models_limit_warn(model):
    """Past max_position_embeddings the model computes, as HF's does, and warns once per call; at the limit
    it is silent (tests/test_parity_hf.py compares the logits past it with HF's)."""
    with pytest.warns(UserWarning, match="2049 positions, past the model's limit of 2048"):
        model.forward(np.zeros((1, 2049), np.int64))
    with pytest.warns(UserWarning, match="2050 positions"):
        model.generate(np.zeros((1, 2040), np.int64), max_new_tokens=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(np.zeros((1, 2040), np.int64), max_new_tokens=8)
