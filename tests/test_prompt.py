"""ref.prompt: chat template rendering, placeholder expansion, token types, streaming detokenisation.

Uses the embedded demo model's tokenizer.json and chat_template.jinja (ref/assets/demo_model), whose
special strings are the real Gemma 4 ones at small ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ref import prompt as P
from ref.errors import ConfigError
from ref.run import DEMO_MODEL


@pytest.fixture(scope="module")
def tok():
    return P.load_tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def template():
    return P.load_chat_template(DEMO_MODEL)


MESSAGES = [
    P.chat_messages("What is this?", n_images=1),
    P.chat_messages("  padded question  ", system="Be brief.", n_images=2, n_videos=1, n_audio=2),
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": [{"type": "text", "text": "more"}]}],
]


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_demo_template_renders_the_turn_format(template, messages, add_generation_prompt):
    """The demo's chat_template.jinja and the built-in fallback write the same text."""
    assert template is not None
    assert (P.render(messages, template, add_generation_prompt=add_generation_prompt)
            == P.turn_format(messages, add_generation_prompt=add_generation_prompt))


def test_turn_format_layout():
    text = P.turn_format(P.chat_messages("Q?", system="S", n_images=1, n_audio=1))
    assert text == ("<bos><|turn>system\nS<turn|>\n<|turn>user\n\n\n<|image|>\n\n<|audio|>Q?<turn|>\n"
                    "<|turn>model\n")


def test_template_variables_and_sandbox_settings():
    """bos_token comes from the caller; trim_blocks / lstrip_blocks are on, as in HF's apply_chat_template."""
    template = "{{ bos_token }}\n  {% for m in messages %}\n[{{ m['content'] }}]\n  {% endfor %}\n"
    text = P.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], template,
                    {"bos_token": "<B>"})
    assert text == "<B>\n[a]\n[b]\n"


def test_template_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="chat_template"):
        P.render(MESSAGES[0], "{% for %}")
    with pytest.raises(ValueError, match="no system role"):
        P.render(MESSAGES[0], "{{ raise_exception('no system role') }}")


def test_timestamps_truncate_minutes_and_seconds():
    assert [P.timestamp(s) for s in (0, 0.99, 59.999, 60.0, 61.5, 3599.9, 3600)] == [
        "00:00", "00:00", "00:59", "01:00", "01:01", "59:59", "60:00"]


def test_expand_replaces_placeholders_in_order():
    text = f"a{P.IMAGE}b{P.AUDIO}c{P.IMAGE}d{P.VIDEO}e"
    out = P.expand(text, image_tokens=[2, 1], audio_tokens=[3], videos=[([0.0, 1.25], 2)])
    assert out == ("a<|image><|image|><|image|><image|>b<|audio><|audio|><|audio|><|audio|><audio|>"
                   "c<|image><|image|><image|>d"
                   "00:00 <|image><|video|><|video|><image|> 00:01 <|image><|video|><|video|><image|>e")


@pytest.mark.parametrize("kwargs", [{"image_tokens": []}, {"image_tokens": [1, 1]}, {"audio_tokens": [4]}])
def test_expand_counts_must_match(kwargs):
    with pytest.raises(ValueError, match="placeholder"):
        P.expand(f"x{P.IMAGE}y", **kwargs)


@settings(max_examples=40, deadline=None)
@given(images=st.lists(st.integers(1, 40), max_size=3), audios=st.lists(st.integers(1, 40), max_size=3),
       videos=st.lists(st.tuples(st.lists(st.floats(0, 4000), min_size=1, max_size=4), st.integers(1, 20)),
                       max_size=2),
       question=st.text(st.characters(codec="utf-8", exclude_characters="<>"), max_size=30))
def test_build_prompt_counts_and_types(tok, template, images, audios, videos, question):
    """Every soft token gets its type; boi/eoi/boa/eoa and timestamps stay text; the text round-trips."""
    p = P.build_prompt(tok, template, question, None, images, audios, videos)
    sp = P.special_ids(tok)
    assert p.count(P.IMAGE_TYPE) == sum(images) == int((p.ids == sp.image).sum())
    assert p.count(P.AUDIO_TYPE) == sum(audios) == int((p.ids == sp.audio).sum())
    assert p.count(P.VIDEO_TYPE) == sum(len(ts) * n for ts, n in videos)
    assert int((p.ids == sp.boi).sum()) == len(images) + sum(len(ts) for ts, _ in videos)
    assert int((p.ids == sp.boa).sum()) == len(audios) == int((p.ids == sp.eoa).sum())
    assert p.types[np.isin(p.ids, [sp.boi, sp.eoi, sp.boa, sp.eoa])].max(initial=0) == 0
    assert p.ids[0] == sp.bos and p.ids.dtype == np.int64 and p.types.shape == p.ids.shape
    assert tok.decode(p.ids.tolist(), skip_special_tokens=False).replace(" ", "") == p.text.replace(" ", "")


def test_special_ids_are_looked_up_by_string(tok, tmp_path):
    sp = P.special_ids(tok)
    assert (sp.bos, sp.eos, sp.pad) == (2, 1, 0)
    assert tok.id_to_token(sp.image) == "<|image|>" and tok.id_to_token(sp.video) == "<|video|>"
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != P.VIDEO]
    del data["model"]["vocab"][P.VIDEO]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"no token '<\|video\|>'"):
        P.special_ids(P.load_tokenizer(tmp_path))


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        P.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        P.load_tokenizer(tmp_path)


def test_chat_template_sources(tmp_path):
    assert P.load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    assert P.load_chat_template(tmp_path) == "{{ bos_token }}"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert P.load_chat_template(tmp_path) == "J"


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("A red é circle.", add_special_tokens=False).ids
    sp = P.special_ids(tok)
    d = P.StreamDecoder(tok)
    pieces = [d.push(i) for i in ids + [sp.turn_end]]
    assert "".join(pieces) == "A red é circle." == d.text()
    assert "\ufffd" not in "".join(pieces)
