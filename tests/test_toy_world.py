"""The toy world, its checker, the toy tokenizer and the committed trained toy teachers."""

import json
import random

import numpy as np
import pytest

import make_toy_teacher
import toy_metrics
import toy_world
from conftest import TOY_TEACHERS


def test_checker_reads_every_drawn_picture():
    records = toy_world.sample_dataset(600, seed=3)
    assert all(toy_world.classify(r["image"]) == (r["color"], r["shape"]) for r in records)
    rng = random.Random(0)
    subject = [toy_world.draw(toy_world.SUBJECT_COLOR, toy_world.SUBJECT_SHAPE, rng) for _ in range(50)]
    assert all(toy_world.shows_prompt(image, toy_world.SUBJECT_PROMPT) for image in subject)


def test_checker_rejects_what_the_prompt_did_not_ask():
    image = toy_world.draw("red", "circle", random.Random(1))
    assert toy_world.shows_prompt(image, "a red circle") and toy_world.shows_prompt(image, "a circle")
    assert not toy_world.shows_prompt(image, "a blue circle") and not toy_world.shows_prompt(image, "a red square")
    grey = np.full((32, 32, 3), 0.5, dtype=np.float32)
    assert toy_world.classify(grey) == (None, None) and not toy_world.shows_prompt(grey, "a circle")
    assert toy_world.prompt_accuracy([image, grey], ["a red circle", "a red circle"]) == 0.5


def test_caption_mix_and_determinism():
    records = toy_world.sample_dataset(2000, seed=5)
    texts = [r["text"] for r in records]
    empty = sum(t == "" for t in texts) / len(texts)
    shape_only = sum(len(t.split()) == 2 for t in texts) / len(texts)
    assert abs(empty - toy_world.EMPTY_CAPTION_RATE) < 0.025
    assert abs(shape_only - toy_world.SHAPE_ONLY_CAPTION_RATE) < 0.03
    again = toy_world.sample_dataset(20, seed=5)
    assert [r["text"] for r in again] == texts[:20]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(again, records))


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    tokenizer = make_toy_teacher.make_word_tokenizer(str(tmp_path / "tok"))
    ids = tokenizer("a red circle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == tokenizer.model_max_length == 8
    assert ids[:5] == [tokenizer.bos_token_id, *[tokenizer.convert_tokens_to_ids(w + "</w>")
                                                 for w in ("a", "red", "circle")], tokenizer.eos_token_id]
    # words outside the world still tokenize (character by character), never to the unknown token
    assert tokenizer.unk_token_id not in tokenizer("zebra!", add_special_tokens=False).input_ids
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) == 5


@pytest.mark.parametrize("kind", ["toy-sd", "toy-sdxl"])
def test_committed_teacher_is_readable_and_follows_prompts(kind):
    path = TOY_TEACHERS / kind
    if not (path / "model_index.json").exists():
        pytest.skip(f"{kind} is not committed")
    report = json.loads((path / "report.json").read_text())
    pipe = toy_metrics.load_pipeline(str(path))
    assert toy_metrics.reconstruction_accuracy(pipe.vae, num_images=60) >= 0.9
    # the 48 samples report.json was measured on
    guided = toy_metrics.evaluate(pipe, "ddim", 50, toy_metrics.TEACHER_GUIDANCE, seeds_per_prompt=4)
    one_step = toy_metrics.evaluate(pipe, "ddim", 1, toy_metrics.TEACHER_GUIDANCE, seeds_per_prompt=4)
    print(kind, guided["accuracy"], one_step["accuracy"], report["accuracy"])
    assert guided["accuracy"] == pytest.approx(report["accuracy"]["ddim50_cfg4"], abs=0.07)
    assert guided["accuracy"] >= 0.6  # follows its prompts in 50 steps (chance: 1/12)...
    assert one_step["accuracy"] <= guided["accuracy"] - 0.15  # ...less so in one: what distillation must fix


def test_intervals_against_written_out_formulas():
    # Wilson score interval of 96 / 192 and of the edge cases, written out (Wilson 1927)
    z = 1.959964
    for successes, count in ((96, 192), (0, 192), (192, 192), (30, 48)):
        p = successes / count
        centre = (p + z * z / (2 * count)) / (1 + z * z / count)
        half = z * np.sqrt(p * (1 - p) / count + z * z / (4 * count**2)) / (1 + z * z / count)
        low, high = toy_metrics.wilson_interval(successes, count)
        assert low == pytest.approx(max(0, centre - half)) and high == pytest.approx(min(1, centre + half))
        assert 0 <= low <= p <= high <= 1
    assert toy_metrics.wilson_interval(96, 192)[1] - 0.5 == pytest.approx(0.070, abs=5e-4)  # the +-0.07 quoted
    values = np.arange(10.0)
    mean, (low, high) = toy_metrics.mean_interval(values)
    assert mean == 4.5 and high - mean == pytest.approx(z * np.std(values, ddof=1) / np.sqrt(10))
    # paired: the same per-sample shift is known exactly, however much the samples spread
    mean, (low, high) = toy_metrics.paired_difference(values + 0.25, values)
    assert mean == pytest.approx(0.25) and high - low == pytest.approx(0.0)


def test_line_chart_reads_on_its_own(tmp_path):
    from PIL import Image

    assert toy_metrics.nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert toy_metrics.nice_ticks(0.04, 0.16) == [0.05, 0.1, 0.15]
    panel = {"title": "prompt accuracy, 1 step", "xlabel": "training steps", "ylim": (0, 1),
             "series": [{"label": "LCD", "points": [(250, 0.4, (0.33, 0.47)), (500, 0.5, None)]}],
             "references": [{"label": "DDIM 1", "y": 0.45}]}
    path = toy_metrics.line_chart([panel, dict(panel, title="again")], str(tmp_path / "chart.png"), columns=2)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] == 2 * 430
    assert (np.abs(image.astype(int) - np.array(toy_metrics.SERIES_COLORS[0])).sum(-1) == 0).sum() > 50  # drawn
