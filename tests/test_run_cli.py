"""`python -m ref.run`: every bad input ends with one `error:` line on stderr, a non-zero exit and no
traceback; reasonable inputs (44.1 kHz stereo WAV, grayscale PNG, a 1x2000 strip, a 0.01 s sound, JPEG,
WebP, GIF, FLAC, OGG, an animated GIF as video) just work.

Most cases call `ref.run.main(argv)` in-process; one runs the real command in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from ref.image import budget_size
from ref.run import DEMO_MODEL, DEMO_PICTURE, DEMO_SOUND, main
from ref.safetensors_io import open_tensors, save_file

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, *words, code=1):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def beeps(rate: int, count: int = 3, freq: float = 1800.0, stereo: bool = False):
    """1.2 s with `count` beeps of 0.16 s, as the demo model was trained on (tools/train_demo_model.py)."""
    t = np.arange(int(rate * 0.16)) / rate
    out = np.zeros(int(rate * 1.2), np.float32)
    for i in range(count):
        s = int(rate * (0.1 + 0.35 * i))
        out[s:s + len(t)] = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([out, out * 0.8], axis=1) if stereo else out


@pytest.fixture
def model_copy(tmp_path):
    return Path(shutil.copytree(DEMO_MODEL, tmp_path / "model"))


# ---- bad input -------------------------------------------------------------------------------------------

def test_missing_file(capsys, tmp_path):
    rc, _, err = run(capsys, "--image", tmp_path / "nope.png")
    assert_one_error_line(rc, err, "nope.png", "no such file")


@pytest.mark.parametrize("flag", ["--image", "--audio", "--video"])
def test_not_media(capsys, tmp_path, flag):
    p = tmp_path / "notes.txt"
    p.write_text("this is plain text, not media\n" * 20)
    rc, _, err = run(capsys, flag, p)
    assert_one_error_line(rc, err, "notes.txt")


def test_corrupt_png(capsys, tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(DEMO_PICTURE.read_bytes()[:120])
    rc, _, err = run(capsys, "--image", p)
    assert_one_error_line(rc, err, "broken.png")


def test_corrupt_wav(capsys, tmp_path):
    p = tmp_path / "broken.wav"
    p.write_bytes(DEMO_SOUND.read_bytes()[:20] + b"\x00garbage" * 10)
    rc, _, err = run(capsys, "--audio", p)
    assert_one_error_line(rc, err, "broken.wav")


def test_corrupt_gif_video(capsys, tmp_path):
    p = tmp_path / "broken.gif"
    frames = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(5)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    p.write_bytes(p.read_bytes()[:200])
    rc, _, err = run(capsys, "--video", p)
    assert_one_error_line(rc, err, "broken.gif")


def test_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    rc, _, err = run(capsys, "--image", p)
    assert_one_error_line(rc, err, "empty.png", "empty")


def test_budget_not_in_list(capsys):
    rc, _, err = run(capsys, "--max-soft-tokens", "100", "--image", DEMO_PICTURE)
    assert_one_error_line(rc, err, "--max-soft-tokens", "100", code=2)


@pytest.mark.parametrize("argv", [["--max-new-tokens", "0"], ["--temperature", "-1"], ["--top-p", "1.5"],
                                  ["--bogus"], ["--backend", "slow"], ["--device", "gpu"]])
def test_bad_flags(capsys, argv):
    rc, _, err = run(capsys, *argv)
    assert_one_error_line(rc, err, code=2)


def test_model_dir_without_config(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", tmp_path)
    assert_one_error_line(rc, err, "config.json")


def test_model_dir_missing(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", tmp_path / "nowhere")
    assert_one_error_line(rc, err, "nowhere")


def test_config_not_json(capsys, model_copy):
    (model_copy / "config.json").write_text('{"model_type": "gemma4_unified",')
    rc, _, err = run(capsys, "--model", model_copy)
    assert_one_error_line(rc, err, "config.json", "not valid JSON")


def test_truncated_safetensors(capsys, model_copy):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, _, err = run(capsys, "--model", model_copy)
    assert_one_error_line(rc, err, "model.safetensors", "truncated")


def test_inconsistent_safetensors(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 96  # the weights are 128 wide
    (model_copy / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run(capsys, "--model", model_copy)
    assert_one_error_line(rc, err, "shape mismatch")


def test_missing_tensor_is_named(capsys, model_copy):
    f = model_copy / "model.safetensors"
    tensors = dict(open_tensors(f))
    name = next(n for n in tensors if n.endswith("layers.3.mlp.up_proj.weight"))
    del tensors[name]
    save_file(tensors, model_copy / "new.safetensors")
    f.unlink()
    (model_copy / "new.safetensors").rename(f)
    rc, _, err = run(capsys, "--model", model_copy)
    assert_one_error_line(rc, err, "missing tensor", "layers.3.mlp.up_proj.weight")


def test_prompt_longer_than_the_model(capsys):
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    limit = cfg["text_config"]["max_position_embeddings"]
    rc, _, err = run(capsys, "--prompt", "shape " * limit, "--image", DEMO_PICTURE)
    assert_one_error_line(rc, err, "tokens long", f"limit of {limit}", "64 image")


def test_audio_longer_than_30_s(capsys, tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, np.zeros(16000 * 31, np.float32), 16000)
    rc, _, err = run(capsys, "--audio", p)
    assert_one_error_line(rc, err, "long.wav", "31.0 s", "30 s", "--audio-chunk")
    rc, out, err = run(capsys, "--audio", p, "--audio-chunk", "--json", "--max-new-tokens", "2")
    assert rc == 0, err
    assert json.loads(out)["tokens"]["audio"] == [750, 25]


def test_no_traceback_from_a_fresh_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ref.run", "--image", str(tmp_path / "missing.jpg")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jpg'}: no such file"]


# ---- reasonable input --------------------------------------------------------------------------------------

def ask_json(capsys, *argv):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_44k_stereo_wav_is_resampled_and_counted(capsys, tmp_path):
    p = tmp_path / "stereo44k.wav"
    sf.write(p, beeps(44100, count=3, stereo=True), 44100)
    r = ask_json(capsys, "--audio", p, "--prompt", "How many beeps?")
    assert r["tokens"]["audio"] == [30]
    assert r["answer"] == "Three."


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_other_audio_formats(capsys, tmp_path, fmt):
    p = tmp_path / f"beeps.{fmt.lower()}"
    sf.write(p, beeps(22050, count=2, freq=300.0), 22050, format=fmt)
    r = ask_json(capsys, "--audio", p, "--prompt", "Is this tone high or low?")
    assert r["answer"] == "Low."


def test_a_hundredth_of_a_second(capsys, tmp_path):
    p = tmp_path / "click.wav"
    sf.write(p, 0.5 * np.sin(2 * np.pi * 1000 * np.arange(480) / 48000), 48000)
    r = ask_json(capsys, "--audio", p, "--max-new-tokens", "4")
    assert r["tokens"]["audio"] == [1]


def test_grayscale_png_and_thin_strip(capsys, tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.linspace(0, 255, 120 * 90).reshape(90, 120).astype(np.uint8), "L").save(gray)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2000, 1), (200, 30, 30)).save(strip)
    r = ask_json(capsys, "--image", gray, "--image", strip, "--max-new-tokens", "4")
    assert r["tokens"]["image"][1] == 70  # one row of 70 model patches: the whole budget


@pytest.mark.parametrize("suffix,mode", [(".jpg", "RGB"), (".webp", "RGB"), (".gif", "P"), (".png", "P"),
                                         (".png", "RGBA"), (".bmp", "RGB")])
def test_picture_formats(capsys, tmp_path, suffix, mode):
    p = tmp_path / f"picture{suffix}"
    Image.open(DEMO_PICTURE).convert(mode).save(p)
    r = ask_json(capsys, "--image", p, "--prompt", "What shape is this and what colour?")
    assert r["answer"] == "A red circle."


def test_animated_gif_as_video(capsys, tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (96, 64), (6 * i, 255 - 6 * i, 128)) for i in range(40)]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r = ask_json(capsys, "--video", p, "--max-new-tokens", "2")
    h, w = budget_size(64, 96, 70)
    assert r["tokens"]["video"] == [32 * (h // 48) * (w // 48)]  # 32 of 40 frames at 70 soft tokens each


def test_gif_first_frame_as_image(capsys, tmp_path):
    p = tmp_path / "anim.gif"
    first = Image.open(DEMO_PICTURE).convert("RGB")
    first.save(p, save_all=True, append_images=[Image.new("RGB", first.size, (0, 0, 255))], duration=100)
    r = ask_json(capsys, "--image", p, "--prompt", "What colour is this?")
    assert r["answer"] == "Red."


def test_fast_backend_gives_the_same_answers(capsys):
    pytest.importorskip("numba", reason="the fast extra is not installed")
    argv = ["--image", DEMO_PICTURE, "--audio", DEMO_SOUND]
    fast, numpy = ask_json(capsys, *argv, "--backend", "fast"), ask_json(capsys, *argv)
    assert fast["answer"] == numpy["answer"]
    # fast's compile (or cache load) is reported on its own, outside the question's timings
    assert fast["timings"]["compile_s"] > 0 and "compile_s" not in numpy["timings"]


def test_gpu_without_cupy_is_one_line(capsys):
    pytest.importorskip("numba", reason="the fast extra is not installed")
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here, so the missing-CuPy error this test expects cannot occur")
    rc, _, err = run(capsys, "--backend", "fast", "--device", "gpu")
    assert_one_error_line(rc, err, "gpu")


def test_streaming_and_summary(capsys):
    rc, out, err = run(capsys, "--image", DEMO_PICTURE, "--prompt", "What shape is this?")
    assert rc == 0
    assert out.strip() == "A circle."
    assert "prompt" in err and "tokens/s" in err


def test_demo_runs_and_answers(capsys):
    rc, out, err = run(capsys)
    assert rc == 0, err
    assert out.count("(correct)") == 4, out
    assert "prefill" in out and "tokens/s" in out


# ---- video frame sampling -----------------------------------------------------------------------------------

def test_frame_sampling_matches_hf_fixture():
    """tests/fixtures/processors/video_sampling.json: HF 5.23's indices and mm:ss strings."""
    from ref.media import sample_indices
    from ref.prompt import timestamp

    fixture = json.loads((ROOT / "tests/fixtures/processors/video_sampling.json").read_text())
    cases = [c for c in fixture["num_frames_sampling"] if "indices" in c]
    assert len(cases) >= 8
    for c in cases:
        idx = sample_indices(c["total_num_frames"], c["num_frames"])
        assert idx.tolist() == c["indices"]
        assert [timestamp(i / c["fps"]) for i in idx] == c["timestamp_strings"]


def test_short_video_uses_every_frame():
    from ref.media import sample_indices

    assert sample_indices(10, 32).tolist() == list(range(10))  # HF raises here; we take all 10


def test_pyav_video(capsys, tmp_path):
    av = pytest.importorskip("av", reason="the video extra (PyAV) is not installed")
    p = tmp_path / "clip.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i in range(50):
            for packet in s.encode(av.VideoFrame.from_ndarray(np.full((64, 96, 3), 5 * i, np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    from ref.media import load_video

    v = load_video(p)
    assert v.total_frames == 50 and v.fps == 25.0 and len(v.frames) == 32
    assert v.timestamps[:3] == [0.0, 0.04, 0.12]  # frames 0, 1, 3 of arange(32) * 50 // 32
    assert np.allclose(v.frames[:, 0, 0, 0], 5 * (np.arange(32) * 50 // 32), atol=6)
    r = ask_json(capsys, "--video", p, "--video-frames", "4", "--max-new-tokens", "2")
    h, w = budget_size(64, 96, 70)
    assert r["tokens"]["video"] == [4 * (h // 48) * (w // 48)]
