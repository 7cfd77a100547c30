"""The Vietnamese sign-text recognizer's contract: a dictionary with every letter and tone, NFC text, a
phrase split that keeps validation phrases out of training, rendered lines the reader can take, and a
CRNN whose ONNX export runs through the production PP-OCR reader exactly as it runs in PyTorch."""

from __future__ import annotations

import copy

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from festival_serve.models.sign_reader import charset as vi

from festival_serve.world import phrases
from festival_serve.models.sign_reader.reader import create_reader
from festival_serve.models.sign_reader.ppocr import model_dictionary, rec_batch, rgb_to_bgr
from festival_serve.models.sign_reader.charset import strip_tones
from festival_serve.pipeline.types import SignText
from festival_serve.pipeline.settings import SignReaderSettings
from festival_serve.world.synth.truth import INFO_TEXTS
from festival_serve.training import sign_reader as st
from festival_serve.models.sign_reader import crnn
from festival_serve.world.synth import text_lines

TINY = crnn.CRNNConfig(channels=(8, 8, 16, 16, 16, 16, 16), hidden=16)


# -- dictionary and text ----------------------------------------------------------------------------

def test_dictionary_has_every_vietnamese_letter_with_every_tone_in_both_cases():
    assert len(vi.TONES) == 6  # no tone + sắc, huyền, hỏi, ngã, nặng
    for vowel in vi.VOWELS:
        for tone in vi.TONES:
            letter = unicodedata.normalize("NFC", vowel + tone)
            assert len(letter) == 1, f"{vowel}+{tone!r} has no precomposed form"
            assert letter in vi.DICTIONARY and letter.upper() in vi.DICTIONARY
    assert {"Đ", "đ", "f", "j", "w", "z", "F", "J", "W", "Z"} <= set(vi.DICTIONARY)
    assert set("0123456789.,:/-%()") <= set(vi.DICTIONARY)
    assert 12 * 6 * 2 + 2 <= len(vi.DICTIONARY) == len(set(vi.DICTIONARY))


def test_dictionary_is_single_nfc_code_points_in_ppocr_layout():
    assert all(len(c) == 1 and unicodedata.is_normalized("NFC", c) for c in vi.DICTIONARY)
    # The file and the ONNX metadata are split into lines: no entry may be a line break, and the space is
    # the class PP-OCR's decoder appends after the dictionary, never an entry of it.
    assert "\n".join(vi.DICTIONARY).splitlines() == list(vi.DICTIONARY)
    assert " " not in vi.DICTIONARY
    assert vi.NUM_CLASSES == len(vi.DICTIONARY) + 2 and vi.SPACE_CLASS == vi.NUM_CLASSES - 1


def test_labels_are_nfc_and_decoding_merges_repeats_and_drops_blanks():
    decomposed = unicodedata.normalize("NFD", "ĐƯỜNG\u2002CAO  TỐC")
    label = vi.nfc(decomposed)
    assert label == "ĐƯỜNG CAO TỐC" and unicodedata.is_normalized("NFC", label)
    codes = vi.encode(label)
    steps = [0] + [c for code in codes for c in (code, code, 0)]  # each class repeated, then a blank
    assert vi.decode(steps) == label
    assert vi.decode([5, 5, 0, 5]) == vi.DICTIONARY[4] * 2
    with pytest.raises(ValueError, match="not in the recognizer's dictionary"):
        vi.encode("東京")


def test_any_decoded_sequence_is_nfc():
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert unicodedata.is_normalized("NFC", vi.decode(rng.integers(0, vi.NUM_CLASSES, 40)))


def test_strip_tones_leaves_no_mark_on_any_letter_of_the_dictionary():
    """The toneless scores compare by strip_tones: every letter the recognizer can read must lose its marks."""
    letters = [c for c in vi.DICTIONARY if c.isalpha()]
    assert all(strip_tones(c).isascii() for c in letters), [c for c in letters if not strip_tones(c).isascii()]
    assert strip_tones("ĐƯỜNG CAO TỐC") == "DUONG CAO TOC"


@pytest.mark.parametrize(("rhyme", "toned"), [("uyên", "ê"), ("ươi", "ơ"), ("ưu", "ư"), ("oa", "o"), ("oan", "a"),
                                              ("ai", "a"), ("oai", "a"), ("uy", "u"), ("uynh", "y"), ("iêu", "ê")])
def test_tone_mark_sits_on_the_right_vowel(rhyme, toned):
    assert rhyme[phrases.tone_position(rhyme)] == toned


def test_syllables_are_spelled_by_the_orthographys_rules():
    rng = np.random.default_rng(1)
    marks = set(vi.TONES[1:])
    for _ in range(3000):
        s = phrases.syllable(rng)
        assert unicodedata.is_normalized("NFC", s) and set(s) <= set(vi.DICTIONARY)
        decomposed = unicodedata.normalize("NFD", s)
        tones = [c for c in decomposed if c in marks]
        assert len(tones) <= 1, s
        if s.endswith(("p", "t", "c", "ch")):
            assert tones and tones[0] in vi.STOP_TONES, f"{s}: a stop coda takes only sắc or nặng"
        bare = vi.strip_tones(s)
        assert not bare.startswith(("ce", "ci", "cy", "ghu", "gha", "ngha", "ka", "ko", "ku", "qo", "quu")), s
        assert not (bare.startswith("k") and not bare.startswith("kh")) or bare[1] in "eiy", s


# -- the phrase split -------------------------------------------------------------------------------

def test_phrase_split_holds_out_whole_phrases_and_keeps_them_out_of_training():
    val, train = set(phrases.phrases("val") + phrases.places("val")), set(phrases.phrases("train") + phrases.places("train"))
    assert len(val) >= 30 and not val & train
    assert val | train == set(phrases.PHRASES + phrases.PLACES)
    assert all(phrases.split_of(text) == "train" for text in INFO_TEXTS), "the world's own texts always train"
    rng = np.random.default_rng(2)
    for _ in range(3000):
        assert not phrases.contains_held_out(phrases.sample_text(rng, "train"))
    assert all(phrases.key(phrases.sample_text(rng, "val")) in {phrases.key(t) for t in val} for _ in range(200))


def test_a_phrase_and_its_variants_share_a_split():
    for text in phrases.PHRASES + phrases.PLACES:
        for variant in (text.lower(), text.title(), vi.strip_tones(text), unicodedata.normalize("NFD", text)):
            assert phrases.split_of(variant) == phrases.split_of(text), variant
    # A phrase that contains a held-out one is held out with it.
    held = next(t for t in phrases.phrases("val") if " " in t)
    assert phrases.split_of(f"CẤM {held} 500 m") == "val"


def test_phrase_split_is_the_same_in_every_process():
    code = "from festival_serve.world import phrases as v; print('|'.join(v.phrases('val') + v.places('val')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip().split("|") == list(phrases.phrases("val") + phrases.places("val"))


# -- rendered lines ---------------------------------------------------------------------------------

def _dejavu() -> list[str]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    faces = [folder / f"DejaVu{name}.ttf" for name in ("Sans", "Sans-Bold", "Serif", "Serif-Bold", "SansMono")]
    return [str(p) for p in faces if p.is_file() and text_lines.covers(p, "".join(vi.DICTIONARY))]


def test_fonts_found_cover_the_whole_dictionary():
    fonts = text_lines.vietnamese_fonts()
    assert len(fonts) >= 2 and "DejaVuSans-Bold.ttf" in {Path(f).name for f in fonts}  # the bundled face
    assert all(text_lines.covers(Path(f), "".join(vi.DICTIONARY)) for f in fonts)


def test_renderer_draws_lines_the_reader_takes_in_several_fonts():
    fonts = _dejavu()
    assert len(fonts) >= 3
    rng = np.random.default_rng(3)
    lo, hi = text_lines.LINE_HEIGHTS
    for font in fonts:
        for _ in range(6):
            text = phrases.sample_text(rng)
            line = text_lines.render_line(text, rng, (font,), neighbour=phrases.sample_text(rng))
            assert line.dtype == np.uint8 and line.ndim == 3 and line.shape[2] == 3
            assert lo <= line.shape[0] <= hi and line.shape[1] >= 2
            assert line.std() > 3, "the line is not blank"
    images, labels = text_lines.sample_lines(5, rng, "val", tuple(fonts))
    batch = st.to_batch(images)
    assert batch.shape[:3] == (5, 3, crnn.HEIGHT) and batch.shape[3] >= 320 and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    assert all(unicodedata.is_normalized("NFC", label) for label in labels)


# -- the model through the production reader ---------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = crnn.build_crnn(TINY).eval()
    with torch.no_grad():  # a confident, uneven output, so argmax decoding is not decided by rounding
        model.head.weight.mul_(20)
    out = tmp_path_factory.mktemp("sign_reader")
    checkpoint = crnn.save_checkpoint(model, out / st.CHECKPOINT)
    return model, crnn.cached_onnx(checkpoint), st.write_dictionary(out)


@pytest.fixture(scope="module")
def lines():
    rng = np.random.default_rng(4)
    return text_lines.sample_lines(6, rng, "val", tuple(_dejavu()[:2]))[0]


@pytest.mark.parametrize("with_dict_file", [True, False], ids=["rec_dict", "onnx_metadata"])
def test_export_runs_through_the_production_reader_as_in_pytorch(exported, lines, with_dict_file, tmp_path):
    model, onnx_path, dict_path = exported
    settings = SignReaderSettings(device="cpu", threads=1, rec_model=str(onnx_path),
                                  rec_dict=str(dict_path) if with_dict_file else None)
    reader = create_reader(settings, model_store=tmp_path)
    assert model_dictionary(reader.rec.session) == list(vi.DICTIONARY)

    bgr = [rgb_to_bgr(line) for line in lines]
    batch = rec_batch(bgr, settings.rec_height)  # what the reader feeds its recognizer
    served = reader.rec.forward(batch)[0]
    with torch.inference_mode():
        expected = crnn.build_recognizer(model)(torch.from_numpy(batch)).numpy()
    assert served.shape == expected.shape == (len(lines), batch.shape[3] // crnn.WIDTH_STRIDE, vi.NUM_CLASSES)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-4)

    texts = [text for text, _ in reader.recognize(bgr)]
    assert texts == [vi.decode(row) for row in served.argmax(-1)]  # rapidocr's decoder = ours, same classes
    assert any(texts) and all(unicodedata.is_normalized("NFC", t) for t in texts)

    crop = np.full((80, 240, 3), (20, 75, 170), np.uint8)
    (result,) = reader.read([crop])
    assert isinstance(result, SignText) and unicodedata.is_normalized("NFC", result.text)


def test_reader_serves_a_checkpoint_through_its_cached_export(exported, lines, tmp_path):
    model, onnx_path, _ = exported
    store = tmp_path / "store"
    checkpoint = crnn.save_checkpoint(model, store / "sign_reader" / st.CHECKPOINT)
    reader = create_reader(SignReaderSettings(device="cpu", threads=1, rec_model=f"sign_reader/{st.CHECKPOINT}"),
                           model_store=store)
    export = crnn.onnx_export_path(checkpoint)
    assert [p.name for p in (store / "sign_reader").glob("*.onnx")] == [export.name]
    expected = [text for text, _ in create_reader(
        SignReaderSettings(device="cpu", threads=1, rec_model=str(onnx_path)), model_store=tmp_path).recognize(
        [rgb_to_bgr(line) for line in lines])]
    assert [text for text, _ in reader.recognize([rgb_to_bgr(line) for line in lines])] == expected

    # Retrained (other bytes): a new export, never the stale one.
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.head.bias.add_(1.0)
    crnn.save_checkpoint(retrained, checkpoint)
    assert crnn.onnx_export_path(checkpoint) != export
    create_reader(SignReaderSettings(device="cpu", threads=1, rec_model=str(checkpoint)), model_store=store)
    assert crnn.onnx_export_path(checkpoint).is_file()


def test_paddle_engine_refuses_a_checkpoint(tmp_path):
    checkpoint = crnn.save_checkpoint(crnn.build_crnn(TINY), tmp_path / st.CHECKPOINT)
    with pytest.raises(ValueError, match="sign-text checkpoint"):
        create_reader(SignReaderSettings(engine="paddle", rec_model=str(checkpoint)), model_store=tmp_path)


def test_export_keeps_dynamic_batch_and_width(exported):
    import onnxruntime as ort

    _, onnx_path, _ = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n, width in ((1, 320), (3, 517), (2, 1200)):
        (probs,) = session.run(None, {"x": np.zeros((n, 3, crnn.HEIGHT, width), np.float32)})
        assert probs.shape == (n, width // crnn.WIDTH_STRIDE, vi.NUM_CLASSES)


def test_checkpoint_refuses_another_dictionary(tmp_path):
    model = crnn.build_crnn(TINY)
    path = crnn.save_checkpoint(model, tmp_path / "a.pt")
    loaded, _ = crnn.load_checkpoint(path)
    assert loaded.config == TINY
    ckpt = torch.load(path, weights_only=True)
    ckpt["dictionary"] = ckpt["dictionary"][:-1]
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="another dictionary"):
        crnn.load_checkpoint(tmp_path / "b.pt")


# -- the trainer ------------------------------------------------------------------------------------

def test_train_command_writes_checkpoint_onnx_dictionary_and_card(tmp_path, capsys):
    from festival_serve.cli import main

    out = tmp_path / "sign_reader"
    tiny = ["--channels", ",".join(map(str, TINY.channels)), "--hidden", str(TINY.hidden)]
    budget = ["--steps", "3", "--batch-size", "4", "--val-lines", "6", "--workers", "0", "--warmup", "1",
              "--log-every", "1"]
    assert main(["train", "sign-text", "--out", str(out), *tiny, *budget]) == 0
    for name in (st.CHECKPOINT, st.DICT_FILE, st.CARD):
        assert (out / name).is_file(), name
    assert crnn.onnx_export_path(out / st.CHECKPOINT).is_file()
    result = capsys.readouterr().out
    assert '"steps": 3' in result and '"lines_per_s"' in result
    card = (out / st.CARD).read_text(encoding="utf-8")
    assert "CRNN" in card and "val.exact_match" in card and "val_served.exact_match" in card
    assert (out / st.DICT_FILE).read_text(encoding="utf-8").split("\n")[:-1] == list(vi.DICTIONARY)

    # --init continues from the checkpoint: its architecture, and the lines it has seen.
    assert main(["train", "sign-text", "--out", str(out), "--init", str(out / st.CHECKPOINT), *budget]) == 0
    _, ckpt = crnn.load_checkpoint(out / st.CHECKPOINT)
    assert ckpt["lines_seen"] == 2 * 3 * 4
