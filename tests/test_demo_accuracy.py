"""The embedded demo model answers: its held-out accuracy, measured by ref (greedy, NumPy), stays above
the floor docs/run.md reports, and the built-in demo's questions get the right answers.

The held-out questions come from tools/train_demo_model.py's generator with a seed training never uses,
the seven question kinds in turn.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ref import media
from ref.run import DEMO_PICTURE, DEMO_QUESTIONS, DEMO_SOUND, Session

ROOT = Path(__file__).resolve().parents[1]
N_HELDOUT = 700  # 100 per question kind, the set docs/run.md reports; about 15 s on 2 cores
FLOOR = 0.95  # overall exact-match accuracy (measured: 0.983)
KIND_FLOOR = 0.90  # every question kind (measured: 0.95 at the lowest, "What shape is this?")


def _trainer():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "tools" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def session():
    return Session.open()


def test_heldout_accuracy_above_floor(session):
    T = _trainer()
    acc = T.score(session.path, T.heldout_set(N_HELDOUT))
    print({k: round(v, 3) for k, v in acc.items()})
    assert acc["all"] >= FLOOR, acc
    assert min(v for k, v in acc.items() if k != "all") >= KIND_FLOOR, acc


def test_bundled_demo_questions(session):
    picture, sound = media.load_image(DEMO_PICTURE), media.load_audio(DEMO_SOUND)
    for use_picture, use_sound, question, expected in DEMO_QUESTIONS:
        a = session.ask(question, images=[picture] if use_picture else [], audios=[sound.wave] if use_sound else [])
        assert a.answer == expected, (question, a.answer)


def test_heldout_set_is_reproducible_and_unseen():
    T = _trainer()
    a, b = T.heldout_set(14), T.heldout_set(14)
    assert [x.answer for x in a] == [x.answer for x in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b) if x.image is not None)
    train = T.make_example(np.random.default_rng(T.TRAIN_SEED), "both")
    assert not np.array_equal(train.image, a[6].image)
