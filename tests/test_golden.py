"""golden/ and ref.verify: the committed cases are complete and reproducible, `ref` (and HF transformers, with the
interop extra) verify on every case, and known bugs, written as small wrappers around ref, are caught at the
stage where they first act, with the right guess at the cause."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import ref.embedders
from ref import golden, verify
from ref.masks import block_ids
from ref.model import load_model
from ref.safetensors_io import save_file

G = golden.GOLDEN_DIR
ROOT = G.parent
BLOCK_CASES = ("solid_colors", "wide_image", "tall_image", "video_frames")


def _case(name):
    return golden.load_case(G / name)


def _verify_cli(*args):
    return subprocess.run([sys.executable, "-m", "ref.verify", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# ---- the files -----------------------------------------------------------------------------------

def test_every_case_is_committed_with_its_files():
    assert len(golden.CASES) >= 10
    for name in golden.CASE_NAMES:
        d = G / name
        for f in ("manifest.json", "inputs.safetensors", "stages.safetensors", "checkpoint/config.json",
                  "checkpoint/model.safetensors", "checkpoint/generation_config.json"):
            assert (d / f).is_file(), f"{name}: no {f}"
        manifest, inputs, stages, plain = _case(name)
        assert manifest["catches"], f"{name}: the manifest names no bug"
        listed = {s["name"]: s for s in manifest["stages"]["list"]}
        assert set(listed) == set(stages)
        for n, s in listed.items():
            assert s["shape"] == list(stages[n].shape) and s["dtype"] == str(stages[n].dtype)
        layers = load_model(d / "checkpoint").config.num_layers
        required = {"text_embeds", "inputs_embeds", "mask.full", "mask.sliding", "final_norm", "logits", "tokens",
                    *(f"layers.{i}" for i in range(layers))}
        if golden.media(inputs, "image"):
            required |= {"pixel_values", "image_position_ids", *(f"vision.{s}" for s in golden.VISION_STEPS)}
        if golden.media(inputs, "video"):
            required |= {"pixel_values_videos", "video_position_ids", *(f"video.{s}" for s in golden.VISION_STEPS)}
        if golden.media(inputs, "audio"):
            required |= {"input_features", "input_features_mask", "audio.rms_norm", "audio.projection"}
        assert required <= set(stages), f"{name}: missing {sorted(required - set(stages))}"
        assert bool(plain) == (name in BLOCK_CASES)


def test_cases_cover_the_bug_classes():
    _, _, solid, _ = _case("solid_colors")
    assert {tuple(np.unique(p[0])) for p in solid["pixel_values"][:, :1]} == {(1.0,), (0.0, 1.0)}
    _, _, wide, _ = _case("wide_image")
    assert wide["image_position_ids"][0, :, 0].max() == 34 and wide["image_position_ids"][0, :, 1].max() == 1
    _, _, tall, _ = _case("tall_image")
    assert tall["image_position_ids"][0, :, 1].max() == 34
    assert (wide["image_position_ids"] != -1).all(-1).sum() > 8 * 8  # a block far longer than the window (8)
    _, _, video, _ = _case("video_frames")
    assert len(video["pixel_values_videos"]) >= 3
    _, _, audio, _ = _case("audio_batch")
    assert audio["input_features_mask"].sum(-1).tolist() == [3, 5] and audio["input_features"][0, 2, -1] == 0
    _, _, folded, _ = _case("folded_eoi_eoa")
    assert set(folded["logits"][0, -1].argsort()[-1:]) <= {504, 506}  # unsuppressed, greedy would pick a folded row
    assert not set(folded["tokens"].ravel()) & {504, 506}
    assert json.loads((G / "bf16_checkpoint/manifest.json").read_text())["checkpoint"]["dtype"] == "BF16"


def test_golden_dir_stays_under_50_mb():
    size = sum(f.stat().st_size for f in G.rglob("*") if f.is_file())
    assert size < 50e6, f"golden/ is {size / 1e6:.1f} MB"


def test_make_is_deterministic_and_the_committed_manifests_are_current(tmp_path):
    names = ["audio_batch", "layer_scalar_extreme"]
    for out in ("a", "b"):
        assert golden.main(["make", "--out", str(tmp_path / out), *names]) == 0
    for name in names:
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / name).rglob("*") if p.is_file())
        for f in files:
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f"{f} differs"
        # A case edited without `make` leaves a stale manifest (stage list, shapes, catches).
        assert (tmp_path / "a" / name / "manifest.json").read_text() == (G / name / "manifest.json").read_text()


# ---- ref, fast and HF against the golden files ---------------------------------------------------

@pytest.mark.parametrize("name", golden.CASE_NAMES)
def test_ref_verifies(name):
    _, inputs, _, _ = _case(name)
    got = golden.run_ref(load_model(G / name / "checkpoint"), inputs)
    v = verify.check(G / name, got)
    assert v.ok, verify.render(v, "ref")
    assert not v.shown.missing


def test_fast_verifies():
    pytest.importorskip("numba", reason="the fast extra is not installed")
    r = _verify_cli("video_frames", "--impl", "fast")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    pytest.importorskip("transformers", reason="the interop extra is not installed")
    return verify


@pytest.mark.parametrize("name", golden.CASE_NAMES)
def test_transformers_verifies(hf, name):
    _, inputs, stages, _ = _case(name)
    got, fed = hf.run_transformers(G / name, inputs, stages, golden.NEW_TOKENS)
    v = hf.check(G / name, got, fed=fed)
    assert v.ok, hf.render(v, "--impl transformers")
    assert set(v.shown.missing) <= set(fed)  # HF exposes every stage it computes


@pytest.mark.parametrize("name", BLOCK_CASES)
def test_hf_plain_forward_matches_the_plain_variant(hf, name):
    """The variant files are made by ref with HF's plain-forward masks; HF's own plain forward must match them,
    and verify must say so."""
    _, inputs, stages, _ = _case(name)
    got, fed = hf.run_transformers(G / name, inputs, stages, golden.NEW_TOKENS, plain=True)
    v = hf.check(G / name, got, masks="plain", fed=fed)
    assert v.ok and not v.spec.ok, hf.render(v, "--impl transformers --hf-plain-masks")
    assert "plain-forward" in v.semantics and v.spec.first_failure.stage == "mask.full"


# ---- mutants: each a small wrapper around ref -------------------------------------------------------

def _swap_xy(model, monkeypatch):
    lookup = ref.embedders.position_embedding
    monkeypatch.setattr(ref.embedders, "position_embedding", lambda pos, table: lookup(pos[..., ::-1], table))


def _layer_norm_eps_1e6(model, monkeypatch):
    model.config = dataclasses.replace(model.config, vision=dataclasses.replace(model.config.vision,
                                                                                layer_norm_eps=1e-6))


def _ignore_layer_scalar(model, monkeypatch):
    for layer in model.params.language_model.layers:
        layer["layer_scalar"] = np.ones(1, np.float32)


def _causal_image_blocks(model, monkeypatch):
    monkeypatch.setattr(model, "blocks", lambda types, shape: block_ids(None, shape))


def _keep_audio_padding(model, monkeypatch):
    """Scatter every frame of the batch, padding included, in order (as masked_scatter does without a check)."""
    embed, scatter, every = ref.embedders.audio_embed, ref.embedders._scatter, {}

    def audio_embed(*args, **kwargs):
        every["frames"] = embed(*args, **kwargs)
        return every["frames"]

    def undropped(x, where, soft, what):
        if what == "audio":
            soft = every["frames"].reshape(-1, x.shape[-1])[: int(where.sum())]
        scatter(x, where, soft, what)

    monkeypatch.setattr(ref.embedders, "audio_embed", audio_embed)
    monkeypatch.setattr(ref.embedders, "_scatter", undropped)


MUTANTS = [
    (_swap_xy, "wide_image", "vision.pos_embed", "x and y look swapped"),
    (_swap_xy, "tall_image", "vision.pos_embed", "x and y look swapped"),
    (_layer_norm_eps_1e6, "tall_image", "vision.ln1", "eps looks like 1e-6"),
    (_ignore_layer_scalar, "layer_scalar_extreme", "layers.0", "layer_scalar looks ignored"),
    (_causal_image_blocks, "wide_image", "mask.sliding", "blocks look causal"),
    (_causal_image_blocks, "video_frames", "mask.sliding", "blocks look causal"),
    (_keep_audio_padding, "audio_batch", "inputs_embeds", "padding frames look not dropped"),
]


@pytest.mark.parametrize("mutate, name, stage, why", MUTANTS, ids=[f"{m[0].__name__[1:]}-{m[1]}" for m in MUTANTS])
def test_mutant_is_caught_at_its_stage(monkeypatch, mutate, name, stage, why):
    _, inputs, _, _ = _case(name)
    model = load_model(G / name / "checkpoint")
    mutate(model, monkeypatch)
    got = golden.run_ref(model, inputs)
    monkeypatch.undo()  # verify's guesses run ref's own functions
    v = verify.check(G / name, got)
    assert not v.ok
    assert v.spec.first_failure.stage == stage, verify.render(v, "mutant")
    assert why in (v.hints.get(stage) or ""), verify.render(v, "mutant")


# ---- dumps and the command line ----------------------------------------------------------------------

def test_identical_dump_passes_and_disturbed_logits_are_named(tmp_path):
    _, _, stages, _ = _case("solid_colors")
    dump = dict(stages, **{"my.debug_tensor": np.zeros(3, np.float32)})
    save_file(dump, tmp_path / "same.safetensors")
    r = _verify_cli("solid_colors", "--tensors", tmp_path / "same.safetensors")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 22 compared stages pass" in r.stdout and "my.debug_tensor" in r.stdout

    logits = stages["logits"].copy()
    logits[0, 7, 11] += 0.05
    save_file(dict(stages, logits=logits), tmp_path / "bad.safetensors")
    r = _verify_cli("solid_colors", "--tensors", tmp_path / "bad.safetensors")
    assert r.returncode == 1
    assert "first failing stage: logits" in r.stdout
    assert [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("logits")] == ["FAIL"]


@pytest.mark.parametrize("stage", ["pixel_values", "vision.pos_embed", "mask.sliding", "layers.3", "tokens"])
def test_one_disturbed_stage_is_the_one_named(stage):
    _, _, stages, _ = _case("wide_image")
    bad = dict(stages)
    a = stages[stage].copy()
    if a.dtype == bool:
        a[0, 5, 40] = ~a[0, 5, 40]
    elif a.dtype.kind == "i":
        a.flat[0] += 1
    else:
        a.flat[a.size // 2] += np.float32(1e-3 * np.abs(a).max())
    bad[stage] = a
    v = verify.check(G / "wide_image", bad)
    assert not v.ok and [r.stage for r in v.shown.rows if not r.ok] == [stage]


def test_partial_dump_hf_layout_and_missing_stages():
    """Stages left out are skipped; HF-style [B, 1, T, S] additive masks are read as masks."""
    _, _, stages, _ = _case("audio_batch")
    additive = np.where(stages["mask.sliding"], 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    v = verify.check(G / "audio_batch", {"mask.sliding": additive, "logits": stages["logits"]})
    assert v.ok and [r.stage for r in v.shown.rows] == ["mask.sliding", "logits"]
    assert "layers.0" in v.shown.missing


def test_plain_semantics_dump_is_recognised():
    _, _, stages, plain = _case("video_frames")
    dump = dict(stages, **plain)
    assert not verify.check(G / "video_frames", dump).ok
    v = verify.check(G / "video_frames", dump, masks="any")
    assert v.ok and "plain-forward" in v.semantics
    assert verify.check(G / "video_frames", dump, masks="plain").ok


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    r = _verify_cli("no_such_case")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "no golden case 'no_such_case'" in r.stderr and "solid_colors" in r.stderr

    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    for dump in (tmp_path / "junk.safetensors", tmp_path / "absent.safetensors"):
        assert verify.main(["audio_batch", "--tensors", str(dump)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("verify: cannot read dump") and len(err.strip().splitlines()) == 1

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert verify.main(["audio_batch", "--impl", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "needs torch and transformers" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setitem(sys.modules, "fast", None)
    assert verify.main(["audio_batch", "--impl", "fast"]) == 2
    err = capsys.readouterr().err
    assert "fast backend is not available" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("tool, argv, says", [
    ("verify", ["audio_batch", "--bogus"], "unrecognized arguments: --bogus"),
    ("verify", ["audio_batch", "--masks", "loose"], "invalid choice: 'loose'"),
    ("golden", ["check"], "invalid choice: 'check'"),
    ("golden", ["make", "--out"], "expected one argument"),
])
def test_a_bad_command_line_is_one_line(capsys, tool, argv, says):
    """argparse's usage block and its own exit replaced by one line and status 2 (ref.errors.OneLineParser),
    a subcommand's arguments included."""
    assert {"verify": verify, "golden": golden}[tool].main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"{tool}: ") and says in err


def test_golden_make_rejects_an_unknown_case(capsys):
    assert golden.main(["make", "--out", "/nonexistent", "nope"]) == 2
    assert "unknown case 'nope'" in capsys.readouterr().err
