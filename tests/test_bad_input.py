"""Bad input (issue 12): high-bit-depth images, stalled shard commands, malformed per-sample metadata, samples
without captions, spreadsheet CSV metadata, out-of-range numeric flags, the wrong kind of model, and the
DreamBooth cache's crops. Most tests drive the data stream or the argument parser directly (no model loads)."""

import ast
import functools
import io
import json
import logging
import os
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import train_bk_sdm_kd as bk
import train_dreambooth_lora as dreambooth
import train_lcm_distill_lora_sd_wds as lcm_lora
import train_lcm_distill_sd_wds as lcd
import train_lcm_distill_sdxl_wds as sdxl

STREAM_MODULES = [lcd, lcm_lora, sdxl, bk]
ALL_MODULES = STREAM_MODULES + [dreambooth]


def write_tar(path, samples):
    """A WebDataset shard from [{"__key__": key, ext: bytes | str | object}] (objects are written as json)."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                if ext == "json" and not isinstance(value, (bytes, str)):
                    value = json.dumps(value)
                data = value.encode("utf-8") if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def png_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def png16(array, color_type):
    """A 16-bit PNG written by hand (PIL cannot write 48/64-bit ones): color_type 0 gray, 2 RGB, 4 LA, 6 RGBA."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def stream(module, urls, batch_size, **kwargs):
    transform = module.ImageTransform(16, "nearest", center_crop=True)
    kwargs.setdefault("shuffle_buffer_size", 0)
    return module.ShardStream(urls, batch_size, transform, seed=0, **kwargs)


def first_batch(module, urls, batch_size, **kwargs):
    return next(iter(stream(module, urls, batch_size, **kwargs)))


def as_uint8(pixel_values):
    """The 8-bit picture a batch's [-1, 1] CHW tensor came from."""
    return np.rint((pixel_values.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


# ---- 1. high-bit-depth and other non-RGB images ------------------------------------------------------------


def high_bit_depth_cases():
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, size=(16, 16)).astype(np.uint16)
    rgb16 = rng.integers(0, 65536, size=(16, 16, 3)).astype(np.uint16)
    to8 = lambda a: np.rint(a / 257.0).astype(np.int64)  # noqa: E731
    floats = rng.random((16, 16)).astype(np.float32)
    tiff = io.BytesIO()
    Image.fromarray(floats).save(tiff, "TIFF")
    rgba = rng.integers(0, 256, size=(16, 16, 4)).astype(np.uint8)
    rgba[..., 3] = 0
    rgba[:8, :, 3] = 255  # top half opaque, bottom half transparent (hidden colours must not show)
    expected_rgba = rgba[..., :3].astype(np.int64).copy()
    expected_rgba[8:] = 255
    return {
        "gray16_pil": (png_bytes(Image.fromarray(gray16)), np.repeat(to8(gray16)[..., None], 3, axis=2)),
        "gray16_raw": (png16(gray16, 0), np.repeat(to8(gray16)[..., None], 3, axis=2)),
        "rgb48": (png16(rgb16, 2), to8(rgb16)),
        "float_tiff": (tiff.getvalue(), np.repeat(np.rint(floats * 255.0).astype(np.int64)[..., None], 3, axis=2)),
        "rgba_transparent": (png_bytes(Image.fromarray(rgba, "RGBA")), expected_rgba),
    }


def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path):
    cases = high_bit_depth_cases()
    samples = [{"__key__": name, "tiff" if name == "float_tiff" else "png": data, "txt": name}
               for name, (data, _) in cases.items()]
    for sample in samples:  # the stream reads .png/.jpg/.webp members; TIFF bytes travel under .png
        if "tiff" in sample:
            sample["png"] = sample.pop("tiff")
    url = write_tar(tmp_path / "deep.tar", samples)
    for module in STREAM_MODULES:
        batch = first_batch(module, [url], len(cases))
        assert batch["n_corrupt"] == 0
        for caption, pixels in zip(batch["captions"], batch["pixel_values"]):
            # PIL itself decodes 48-bit RGB to 8 bits by keeping the high byte: off by at most 1 from rounding
            tolerance = 1 if caption == "rgb48" else 0
            difference = np.abs(as_uint8(pixels) - cases[caption][1]).max()
            assert difference <= tolerance, (module.__name__, caption, difference)
    for name, (data, expected) in cases.items():  # DreamBooth reads files from a folder
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        difference = np.abs(np.asarray(dreambooth.load_image(str(path)), dtype=np.int64) - expected).max()
        assert difference <= (1 if name == "rgb48" else 0), (name, difference)


def test_palette_la_and_cmyk_become_sensible_rgb():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    np.testing.assert_array_equal(np.asarray(lcd.to_rgb(palette)), np.asarray(palette.convert("RGB")))
    la = Image.merge("LA", [Image.fromarray(rgb[..., 0]), Image.new("L", (8, 8), 0)])
    assert (np.asarray(lcd.to_rgb(la)) == 255).all()  # fully transparent: the white background
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(np.asarray(lcd.to_rgb(cmyk)).astype(int) - rgb).max() <= 1


# ---- 3 and 4. malformed metadata, samples without captions -------------------------------------------------


def good_png(value=128):
    return png_bytes(Image.new("RGB", (16, 16), (value, value, value)))


def test_malformed_metadata_is_skipped_and_counted_for_every_field(tmp_path, caplog):
    bad_json = [
        ["a", "list"], "a string", 3, None,  # valid json, not an object
        {"width": "wide", "height": 16}, {"original_width": None, "original_height": 16},
        {"width": [16], "height": 16}, {"width": True, "height": 16},
        {"pwatermark": "low"}, {"pwatermark": None}, {"aesthetic": [5]}, {"aesthetic_score": False},
        {"aesthetic": "NaN"}, {"caption": {"text": "nested"}},
    ]
    samples = [{"__key__": f"bad{i}", "png": good_png(), "json": json.dumps(meta)} for i, meta in enumerate(bad_json)]
    samples += [{"__key__": "numeric_strings", "png": good_png(), "json": {"width": "64", "height": "64",
                                                                          "aesthetic": "6.5", "pwatermark": "0.1"},
                 "txt": "csv-like strings are numbers"},
                {"__key__": "good", "png": good_png(),
                 "json": {"width": 640, "height": 480, "caption": "json caption"}}]
    url = write_tar(tmp_path / "malformed.tar", samples)
    for module in STREAM_MODULES:
        filters = module.SampleFilter(min_image_size=8, max_watermark_probability=0.5, min_aesthetic_score=5.0)
        batch = first_batch(module, [url], 2, sample_filter=filters, needs_original_size=module is sdxl)
        assert batch["captions"] == ["csv-like strings are numbers", "json caption"], module.__name__
        assert batch["n_malformed"] == len(bad_json) and batch["n_filtered"] == 0 and batch["n_corrupt"] == 0
        # only SDXL reads the json size beyond the size filter (micro-conditioning, (h, w))
        sizes = [[64, 64], [480, 640]] if module is sdxl else [[16, 16], [16, 16]]
        assert batch["original_sizes"].tolist() == sizes
    with pytest.raises(sdxl.MalformedMetadata):  # would overflow the int64 time ids
        sdxl.original_size_from_metadata({"original_width": 1e40, "original_height": 16})
    # a resumed stream replays (skips) the same samples without stopping either
    batch = first_batch(lcd, [url], 1, sample_filter=lcd.SampleFilter(8, 0.5, 5.0), skip_batches=1)
    assert batch["captions"] == ["json caption"]
    # fields no active filter reads do not reject a sample
    lenient = first_batch(lcd, [url], 2, sample_filter=lcd.SampleFilter())
    assert lenient["n_malformed"] < len(bad_json)


def test_samples_without_any_caption_are_counted_with_one_warning(tmp_path, caplog):
    url = write_tar(tmp_path / "nocaption.tar", [
        {"__key__": f"s{i}", "png": good_png(), "json": {"width": 16, "height": 16}} for i in range(4)
    ] + [{"__key__": "captioned", "png": good_png(), "txt": "a caption"}])
    with caplog.at_level(logging.WARNING):
        batch = first_batch(lcd, [url], 5)
    assert batch["n_uncaptioned"] == 4 and batch["captions"][:4] == [""] * 4
    warnings = [r.getMessage() for r in caplog.records if "without a caption" in r.getMessage()]
    assert len(warnings) == 1 and "nocaption.tar" in warnings[0] and "unconditionally" in warnings[0]
    assert "4 without a caption" in lcd.describe_data_counts(batch)
    assert lcd.data_count_logs(batch)["data/uncaptioned"] == 4


# ---- 2. stalled shard commands -----------------------------------------------------------------------------


def test_stalled_pipe_shard_is_abandoned_and_counted(tmp_path, caplog):
    good = write_tar(tmp_path / "good.tar", [{"__key__": f"g{i}", "png": good_png(i), "txt": f"good {i}"}
                                             for i in range(4)])
    pids = tmp_path / "pids"
    urls = [
        f"pipe:echo $$ >> {pids}; exec sleep 1000",  # sends nothing at all
        f"pipe:head -c 2560 {good}; echo $$ >> {pids}; exec sleep 1000",  # half a tar, then nothing
        f"pipe:cat {good}",
    ]
    started = time.monotonic()
    counts = lcd.new_data_counts()
    with caplog.at_level(logging.WARNING):
        samples = list(stream(lcd, urls, 1, shard_read_timeout=1.0)._raw_samples(urls, counts))
    assert time.monotonic() - started < 30
    assert counts["n_stalled"] == 2
    keys = [s["__key__"] for s in samples]
    assert keys[-4:] == ["g0", "g1", "g2", "g3"]  # the good shard is read in full after the stalled ones
    assert [r for r in caplog.records if "stalled shard" in r.getMessage() and "--shard_read_timeout" in r.getMessage()]
    for pid in pids.read_text().split():  # the stalled commands were killed, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    # a command that exits non-zero is an unreadable shard, not a silent short one
    counts = lcd.new_data_counts()
    assert list(stream(lcd, ["pipe:false"], 1)._raw_samples(["pipe:false"], counts)) == []
    assert counts["n_corrupt"] == 1 and counts["n_stalled"] == 0


def test_only_stalled_shards_fail_with_one_line(tmp_path):
    with pytest.raises(lcd.DataError, match=r"gave no usable sample \(0 unreadable, 1 stalled shard"):
        first_batch(lcd, ["pipe:sleep 1000"], 1, shard_read_timeout=0.5)


def test_readme_curl_lines_cannot_stall():
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    curls = [line for line in text.splitlines() if "pipe:curl" in line]
    assert curls
    for line in curls:
        assert "--speed-limit" in line and "--speed-time" in line and "--fail" in line, line


# ---- 5. image-folder metadata as spreadsheets write it -----------------------------------------------------


def image_folder(tmp_path, names=("a.png", "b.png", "c.png")):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / name)
    return folder


def test_spreadsheet_csv_metadata_reads(tmp_path):
    folder = image_folder(tmp_path)
    # Excel's "CSV UTF-8": byte-order mark, CRLF, quotes around fields holding commas, quotes or line breaks
    (folder / "metadata.csv").write_bytes(
        "\ufefffile_name,text,aesthetic\r\n"
        'a.png,"a dog, sitting",6.5\r\n'
        'b.png,"a ""quoted"" café\r\non two lines",\r\n'
        "c.png,plain,7\r\n".encode("utf-8"))
    entries = bk.read_image_folder(str(folder), "file_name", "text")
    assert [(os.path.basename(p), c) for p, c, _ in entries] == [
        ("a.png", "a dog, sitting"), ("b.png", 'a "quoted" café\r\non two lines'), ("c.png", "plain")]
    assert entries[0][2]["aesthetic"] == "6.5"
    # European Excel: ';' separators and Windows-1252 text
    (folder / "metadata.csv").write_bytes("file_name;text\r\na.png;un chien, assis\r\nb.png;café\r\n"
                                          .encode("cp1252"))
    entries = bk.read_image_folder(str(folder), "file_name", "text")
    assert [c for _, c, _ in entries] == ["un chien, assis", "café"]
    # the CSV's string cells pass the metadata filters as numbers, an empty cell counts as absent
    assert bk.SampleFilter(min_aesthetic_score=6.0).reject_by_metadata({"aesthetic": "6.5"}) is None
    assert bk.SampleFilter(min_aesthetic_score=6.0).reject_by_metadata({"aesthetic": ""}) is None


@pytest.mark.parametrize("name, content, line", [
    ("metadata.csv", "file_name,text\r\na.png,ok\r\n,no file name\r\n", 3),
    ("metadata.csv", "text,file_name\nok,a.png\nok,b.png\n\"only a caption, short row\"\n", 4),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"text": "no file name"}\n', 2),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n\n{"file_name": null, "text": "x"}\n', 3),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n["a.png", "x"]\n', 2),
])
def test_metadata_row_without_file_name_is_one_line_naming_the_line(assets, tmp_path, capsys, name, content, line):
    folder = image_folder(tmp_path)
    (folder / name).write_text(content, newline="")
    with pytest.raises(bk.DataError, match=rf"{name} line {line}\b"):
        bk.read_image_folder(str(folder), "file_name", "text")
    from conftest import rejection_line

    # a real teacher folder: the teacher's kind is checked (and a Hub id fetched) before the data
    message = rejection_line(bk, ["--pretrained_teacher_model", assets["tiny-sd"], "--train_data_dir", str(folder),
                                  "--output_dir", str(tmp_path / "out")], capsys)
    assert f"{name} line {line}" in message


# ---- 6. every numeric flag is range-checked by argparse ----------------------------------------------------


def required_flags(module, tmp_path):
    """The smallest argv a script accepts (nothing is checked that depends on it: parsing stops at the error)."""
    if module is dreambooth:
        return ["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", str(tmp_path),
                "--instance_prompt", "x"]
    return ["--pretrained_teacher_model", "org/model", "--train_shards_path_or_url", "data.tar"]


def parser_of(module, monkeypatch, tmp_path):
    """The ArgumentParser a script builds, caught as it starts parsing."""
    caught = {}

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        caught["parser"] = self
        raise Caught

    monkeypatch.setattr(module.OneLineErrorParser, "parse_args", catch)
    with pytest.raises(Caught):
        module.parse_args(required_flags(module, tmp_path))
    monkeypatch.undo()
    return caught["parser"]


def bad_values(bounds, kind):
    low, high, low_open, high_open = bounds
    values = ["nan", "inf", "-inf", "ten"] + (["2.5"] if kind == "int" else [])
    if low is not None:
        values.append(str(low if low_open else low - (1 if kind == "int" else 1e-3)))
    if high is not None:
        values.append(str(high if high_open else high + (1 if kind == "int" else 1e-3)))
    return values


@pytest.mark.parametrize("module", ALL_MODULES, ids=lambda m: m.__name__)
def test_every_numeric_flag_rejects_out_of_range_values(module, monkeypatch, tmp_path, capsys):
    from conftest import rejection_line

    parser = parser_of(module, monkeypatch, tmp_path)
    numeric = [a for a in parser._actions if getattr(a.type, "__name__", None) in ("int", "float")
               or a.type in (int, float)]
    assert len(numeric) >= 25
    unchecked = [a.option_strings[0] for a in numeric if not hasattr(a.type, "bounds")]
    assert not unchecked, f"numeric flags without a range check: {unchecked}"
    checked = 0
    for action in numeric:
        flag = action.option_strings[0]
        for value in bad_values(action.type.bounds, action.type.__name__):
            line = rejection_line(module, required_flags(module, tmp_path) + [f"{flag}={value}"], capsys)
            assert line.startswith(f"{parser.prog}: error: argument {flag}"), (flag, value, line)
            checked += 1
    assert checked >= 5 * len(numeric)
    # the example of the issue, and values at the edge of the range still parse
    line = rejection_line(module, required_flags(module, tmp_path) + ["--learning_rate", "-1"], capsys)
    assert line.endswith("argument --learning_rate: must be > 0, got -1")
    assert parser_action(parser, "--adam_beta2").type("0") == 0.0
    assert parser_action(parser, "--max_grad_norm").type("0") == 0.0


def parser_action(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


# ---- 7. the wrong kind of model is named at start-up, before any weight loads ------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl_configs(tmp_path_factory):
    from make_random_pipeline import build_pipeline

    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("kind") / "tiny-sdxl"), seed=0)


def model_argv(module, model, tmp_path, vae=None):
    flag = "--pretrained_model_name_or_path" if module is dreambooth else "--pretrained_teacher_model"
    argv = required_flags(module, tmp_path)
    argv[argv.index(flag if module is dreambooth else "--pretrained_teacher_model") + 1] = str(model)
    return argv + (["--pretrained_vae_model_name_or_path", str(vae)] if vae is not None else [])


def test_wrong_kind_of_model_is_one_line_before_loading(assets, tiny_sdxl_configs, tmp_path, capsys, monkeypatch):
    from conftest import rejection_line

    # any attempt to load weights would be a failure of this check
    import diffusers

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the model kind was checked")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(no_loading))
    sd, sdxl_path = assets["tiny-sd"], tiny_sdxl_configs
    empty = tmp_path / "empty"
    empty.mkdir()
    for module in (lcd, lcm_lora, bk, dreambooth):
        flag = "--pretrained_model_name_or_path" if module is dreambooth else "--pretrained_teacher_model"
        if module not in (dreambooth, bk):  # DreamBooth and BK-SDM (SSD-1B, Vega, KOALA students) train SDXL too
            line = rejection_line(module, model_argv(module, sdxl_path, tmp_path), capsys)
            assert f"{flag}: {sdxl_path} is an SDXL pipeline (StableDiffusionXLPipeline); expected a Stable " \
                   "Diffusion 1.x/2.x pipeline" in line, line
        line = rejection_line(module, model_argv(module, empty, tmp_path), capsys)
        assert f"{empty} is empty; expected a Stable Diffusion 1.x/2.x pipeline folder" in line, line
        line = rejection_line(module, model_argv(module, os.path.join(sd, "unet"), tmp_path), capsys)
        assert "is a single UNet2DConditionModel folder; expected a Stable Diffusion" in line, line
    line = rejection_line(sdxl, model_argv(sdxl, sd, tmp_path), capsys)
    assert f"--pretrained_teacher_model: {sd} is a StableDiffusionPipeline without SDXL's second text encoder" in line
    assert "expected an SDXL pipeline" in line
    for module, teacher in ((lcd, sd), (lcm_lora, sd), (sdxl, sdxl_path), (bk, sd), (bk, sdxl_path)):
        line = rejection_line(module, model_argv(module, teacher, tmp_path, vae=sd), capsys)
        assert f"--pretrained_vae_model_name_or_path: {sd} is a whole pipeline; pass its vae/ subfolder" in line
        line = rejection_line(module, model_argv(module, teacher, tmp_path, vae=os.path.join(sd, "unet")), capsys)
        assert "is a UNet2DConditionModel folder; expected an AutoencoderKL (VAE) folder" in line, line
    # the right kinds pass this check
    assert lcd.pipeline_kind_problem(sd, "sd") is None and sdxl.pipeline_kind_problem(sdxl_path, "sdxl") is None
    assert lcd.vae_kind_problem(os.path.join(sd, "vae")) is None
    # a pipeline missing one of its parts
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "has no scheduler/ folder" in lcd.pipeline_kind_problem(str(partial), "sd")


# ---- defect 8: DreamBooth's cache holds several crops per image, drawn at each use -------------------------


class IdentityVAE:
    """A VAE stand-in whose posterior mean is the picture itself and whose std is 0, so cached 'latents' show
    which crop (and flip) a use got."""

    device, dtype = torch.device("cpu"), torch.float32

    class config:  # noqa: N801
        scaling_factor = 1.0

    def encode(self, pixels):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels, std=torch.zeros_like(pixels)))


def test_dreambooth_cache_draws_among_several_crops(tmp_path):
    wide = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (16, 1, 3)))  # 48 x 16
    square = Image.new("RGB", (16, 16), (10, 200, 30))
    transform = dreambooth.ImageTransform(16)
    images = dreambooth.ImageSet([wide, square])
    dreambooth.cache_latents(IdentityVAE(), images, transform, random_flip=True, num_crops=4)
    assert [m.shape[:2] for m in images.mean] == [(2, 4), (2, 1)]  # (flips, crops): a square has one crop
    # the cached crops are evenly spaced from the left edge to the right edge of the resized picture
    lefts = [int(round((images.mean[0][0, k, 0, 0, 0].item() + 1) * 127.5)) // 5 for k in range(4)]
    assert lefts == [0, 11, 21, 32]
    positions = list(range(200))
    seen = set()
    for flip in (False, True):
        latents, _ = dreambooth.sample_latents(IdentityVAE(), images, [0] * 200, [flip] * 200, transform,
                                               positions, 0, "instance", cached=True)
        seen |= {tuple(latent[0, 0].tolist()) for latent in latents}
        first_columns = {round((latent[0, 0, 0].item() + 1) * 127.5) // 5 for latent in latents}
        assert first_columns == ({0, 11, 21, 32} if not flip else {15, 26, 36, 47})
    assert len(seen) == 8  # 4 crops x 2 flips all used
    # uncached: any crop offset, so more distinct crops than the cache holds
    latents, _ = dreambooth.sample_latents(IdentityVAE(), images, [0] * 200, [False] * 200, transform, positions, 0,
                                           "instance", cached=False)
    assert len({round((latent[0, 0, 0].item() + 1) * 127.5) // 5 for latent in latents}) > 4
    # --center_crop: one crop, the same as --no_cache gives
    centre = dreambooth.ImageSet([wide])
    dreambooth.cache_latents(IdentityVAE(), centre, dreambooth.ImageTransform(16, center_crop=True), False, 4)
    assert centre.mean[0].shape[:2] == (1, 1)
    uncached, _ = dreambooth.sample_latents(IdentityVAE(), centre, [0], [False], dreambooth.ImageTransform(
        16, center_crop=True), [5], 0, "instance", cached=False)
    torch.testing.assert_close(centre.mean[0][0, 0], uncached[0])


# ---- the whole script: every kind of bad sample at once is skipped, counted and reported --------------------


@pytest.mark.slow
def test_training_survives_bad_samples_and_a_stalled_shard(assets, tmp_path):
    from conftest import run_in_process
    from test_lcm_sd_e2e import SCRIPT, common_flags

    rng = np.random.default_rng(2)
    deep = [{"__key__": f"deep{i}", "png": png16(rng.integers(0, 65536, (64, 64, 3)).astype(np.uint16), 2),
             "txt": "a 48-bit picture"} for i in range(2)]
    deep += [{"__key__": f"gray{i}", "png": png_bytes(Image.fromarray(rng.integers(0, 65536, (64, 64))
                                                                       .astype(np.uint16))), "txt": "16-bit grey"}
             for i in range(2)]
    bad = [{"__key__": "list", "png": good_png(), "json": [1, 2]},
           {"__key__": "size", "png": good_png(), "json": {"original_width": "big", "original_height": 64}},
           {"__key__": "nocaption", "png": good_png(), "json": {"width": 64, "height": 64}}]
    shard = write_tar(tmp_path / "mixed.tar", bad + deep)  # the bad ones first: read before 2 steps end
    shards = f"{shard}::pipe:sleep 1000"
    out = tmp_path / "out"
    flags = common_flags(assets["tiny-sd"], shards, out) + [
        # one loader worker: the watchdog runs in a DataLoader process; the counts reach the trainer with the batches
        "--max_train_steps", "2", "--dataloader_num_workers", "1", "--shuffle_buffer_size", "0",
        "--shard_read_timeout", "1", "--validation_prompts", "--report_to", "none", "--checkpointing_steps", "2",
    ]
    result = run_in_process(SCRIPT, flags)
    summary = [line for line in result.stdout.splitlines() if "data: " in line]
    assert summary, result.stdout[-3000:]
    # the json size is not needed by this SD script (no size filter): only the list json is malformed here
    assert "1 with malformed metadata" in summary[-1] and "1 stalled shard(s) abandoned" in summary[-1], summary
    assert "2 without a caption" in summary[-1]
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["n_malformed"] == 1 and state["n_stalled"] == 1 and state["n_uncaptioned"] == 2
    assert (out / "unet_target" / "config.json").is_file()


@pytest.mark.skipif(__import__("shutil").which("curl") is None, reason="needs curl")
def test_http_shards_are_read_with_curl_under_the_watchdog(tmp_path):
    import http.server
    import socket
    import threading

    good = write_tar(tmp_path / "good.tar", [{"__key__": f"h{i}", "png": good_png(i), "txt": "x"} for i in range(3)])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/stall.tar":  # headers, then silence: a dead connection
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                time.sleep(5)
                return
            if self.path != "/good.tar":
                self.send_error(404)
                return
            data = open(good, "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        urls = [f"{base}/stall.tar", f"{base}/missing.tar", f"{base}/good.tar"]
        counts = lcd.new_data_counts()
        samples = list(stream(lcd, urls, 1, shard_read_timeout=1.0)._raw_samples(urls, counts))
        assert [s["__key__"] for s in samples] == ["h0", "h1", "h2"]
        assert counts["n_stalled"] == 1 and counts["n_corrupt"] == 1  # the 404 is an error, not a tar
    finally:
        server.shutdown()
        socket.setdefaulttimeout(None)


def test_make_wds_shards_reads_spreadsheet_csv_and_names_bad_rows(tmp_path):
    import make_wds_shards

    folder = image_folder(tmp_path)
    (folder / "metadata.csv").write_bytes('\ufefffile_name,text,aesthetic\r\na.png,"a dog, sitting",6.5\r\n'
                                          'b.png,"two\r\nlines",\r\n'.encode("utf-8"))
    metadata = make_wds_shards.read_metadata(str(folder))
    assert metadata == {"a.png": ("a dog, sitting", {"aesthetic": 6.5}), "b.png": ("two\r\nlines", {"aesthetic": None})}
    (folder / "metadata.csv").write_text("file_name;text\na.png;ok\n;no file\n", newline="")
    with pytest.raises(ValueError, match=r"metadata.csv:3: no 'file_name'"):
        make_wds_shards.read_metadata(str(folder))
    (folder / "metadata.csv").unlink()
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"text": "no file"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: no 'file_name'"):
        make_wds_shards.read_metadata(str(folder))


# ---- 7. poor answers (issue 21): captions not in UTF-8, file names with several dots, tars cut in a header ---


def test_captions_not_in_utf8_are_read_as_cp1252_and_counted_everywhere(tmp_path, caplog):
    import make_wds_shards

    cafe = "café crème, naïve"
    url = write_tar(tmp_path / "cp1252.tar", [
        {"__key__": "txt", "png": good_png(), "txt": cafe.encode("cp1252")},
        {"__key__": "json", "png": good_png(), "json": json.dumps({"caption": cafe}, ensure_ascii=False)
         .encode("cp1252")},
        # Notepad's "UTF-8 with BOM" and "Unicode" (UTF-16): exact, not counted
        {"__key__": "bom", "png": good_png(), "txt": "\ufeff" + cafe},
        {"__key__": "utf16", "png": good_png(), "txt": cafe.encode("utf-16")},
    ])
    for module in STREAM_MODULES:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            batch = first_batch(module, [url], 4)
        assert batch["captions"] == [cafe] * 4, module.__name__
        assert batch["n_not_utf8"] == 2 and batch["n_corrupt"] == 0
        warnings = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
        assert len(warnings) == 1 and "sample txt in" in warnings[0] and "Windows-1252" in warnings[0]
        assert "2 with a caption or json not in UTF-8" in module.describe_data_counts(batch)
        assert module.data_count_logs(batch)["data/not_utf8"] == 2
    # DreamBooth's .txt captions beside the images
    folder = image_folder(tmp_path, names=("a.png", "b.png"))
    (folder / "a.txt").write_bytes(cafe.encode("cp1252"))
    (folder / "b.txt").write_text("plain", encoding="utf-8")
    _, captions, _, not_utf8 = dreambooth.read_captioned_folder(str(folder), "file_name", "text")
    assert captions == [cafe, "plain"] and not_utf8 == ["a.txt"]  # DreamBoothExamples warns once, naming a.txt
    # tools/make_wds_shards.py's .txt sidecars: written as UTF-8 into the shard, and reported
    result = make_wds_shards.make_shards(str(folder), str(tmp_path / "shards"))
    with tarfile.open(result["shards"][0]) as tar:
        assert tar.extractfile("a.txt").read().decode("utf-8") == cafe
    assert make_wds_shards.format_summary(result).splitlines() == [
        f"kept 2 samples in 1 shard: {result['url_pattern']}",
        "read 1 caption file as Windows-1252 (not UTF-8), e.g. a.txt"]


def test_member_names_with_several_dots_are_explained(tmp_path, caplog):
    import make_wds_shards

    url = write_tar(tmp_path / "dots.tar", [
        {"__key__": "IMG_0000.HEIC", "jpg": good_png(), "txt": "a photo"},  # IMG_0000.HEIC.jpg, IMG_0000.HEIC.txt
        {"__key__": "scan", "gif": b"GIF89a", "txt": "not an image type the scripts take"},
        {"__key__": "photo", "jpg": good_png(), "jpg.txt": "a caption the reader cannot see"},  # photo.jpg.txt
        {"__key__": "good", "png": good_png(), "txt": "good"},
    ])
    with caplog.at_level(logging.WARNING):
        batch = first_batch(lcd, [url], 2)
    assert batch["captions"] == ["", "good"] and batch["n_corrupt"] == 2 and batch["n_uncaptioned"] == 1
    assert [r.getMessage() for r in caplog.records if "photo" in r.getMessage() and "several dots" in r.getMessage()
            ] == [f"sample photo in {url}: its 'jpg.txt' is not read as its txt: {lcd.SEVERAL_DOTS_ADVICE}"]
    dotted, other = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert dotted.startswith(f"skipping sample IMG_0000 in {url} has members 'heic.jpg', 'heic.txt' and no "
                             "jpg/jpeg/png/webp: a file name with several dots")
    assert "tools/make_wds_shards.py" in dotted and "data/skipped_unreadable" in dotted
    assert other == (f"skipping sample scan in {url} has no jpg/jpeg/png/webp member (members: 'gif', 'txt'); "
                     "counted as data/skipped_unreadable")
    # the tool that writes shards never names a member so: one dot, between key and extension
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "IMG_0000.HEIC.jpg", "JPEG")
    (folder / "IMG_0000.HEIC.txt").write_text("a photo")
    result = make_wds_shards.make_shards(str(folder), str(tmp_path / "shards"))
    with tarfile.open(result["shards"][0]) as tar:
        assert sorted(tar.getnames()) == ["IMG_0000_HEIC.jpg", "IMG_0000_HEIC.json", "IMG_0000_HEIC.txt"]
    assert first_batch(lcd, result["shards"], 1)["captions"] == ["a photo"]


def test_tar_cut_or_garbled_anywhere_is_counted_once_and_drops_the_broken_sample(tmp_path, caplog):
    write_tar(tmp_path / "whole.tar", [{"__key__": f"s{i}", "png": good_png(i), "txt": f"caption {i}"}
                                       for i in range(3)])
    whole = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        offsets = {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}
    garbled = bytearray(whole)
    garbled[offsets["s2.png"][0]:offsets["s2.png"][0] + 512] = b"x" * 512
    cases = {  # the shard's bytes, the samples read whole, the words of the warning
        "in the header of a sample's first member": (whole[:offsets["s2.png"][0] + 100], ["s0"], "a member header"),
        "in the header of its second member": (whole[:offsets["s2.txt"][0] + 100], ["s0", "s1"], "a member header"),
        "at a member boundary": (whole[:offsets["s2.png"][0]], ["s0"], "without the tar end-of-archive block"),
        "a garbled header": (bytes(garbled), ["s0"], "garbled member header"),
        "inside a member's data": (whole[:offsets["s2.txt"][1] + 2], ["s0", "s1"], "inside member s2.txt"),
    }
    for case, (data, keys, words) in cases.items():
        path = tmp_path / "cut.tar"
        path.write_bytes(data)
        counts = lcd.new_data_counts()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            samples = list(stream(lcd, [str(path)], 1)._raw_samples([str(path)], counts))
        # a sample whose members may be missing (its caption, its json) is dropped, not trained on
        assert [s["__key__"] for s in samples] == keys, case
        assert all(set(s) == {"__key__", "__url__", "png", "txt"} for s in samples), case
        assert counts["n_corrupt"] == 1 and sum(counts.values()) == 1, case
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and f"the rest of {path}" in warnings[0] and words in warnings[0], (case, warnings)
    counts = lcd.new_data_counts()  # the whole shard: every sample, nothing counted
    whole = str(tmp_path / "whole.tar")
    assert len(list(stream(lcd, [whole], 1)._raw_samples([whole], counts))) == 3 and sum(counts.values()) == 0


# ---- issue 21: nothing logs through accelerate's logger before the Accelerator exists ------------------------
# accelerate's logger raises "You must initialize the accelerate state" when no Accelerator (PartialState) exists:
# a warning in an argument check, a data-folder reader or a tool would crash the run instead of warning.


@functools.lru_cache(maxsize=None)
def parsed(path):
    return ast.parse(open(path, encoding="utf-8").read())


def accelerate_logger_uses(path, roots):
    """{function: line} of `logger.<level>` calls (the scripts' accelerate logger) in the functions of `path` that
    `roots` reach by name: its functions and classes (and their bases) named or called, `self.` / `cls.` /
    `Class.` methods. A class named counts as all its methods run."""
    tree = parsed(path)
    definitions, classes = {}, {}  # "name" or "Class.name" -> (def, its class); class -> (methods, bases)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            definitions[node.name] = (node, None)
        elif isinstance(node, ast.ClassDef):
            own = [item for item in node.body if isinstance(item, ast.FunctionDef)]
            classes[node.name] = ([item.name for item in own], [b.id for b in node.bases if isinstance(b, ast.Name)])
            definitions.update({f"{node.name}.{item.name}": (item, node.name) for item in own})
    found, seen, todo = {}, set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in classes:
            methods, bases = classes[name]
            todo += [f"{name}.{method}" for method in methods] + bases
        if name not in definitions:
            continue
        function, owner = definitions[name]
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and (node.id in definitions or node.id in classes):
                todo.append(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "logger":
                    found.setdefault(name, node.lineno)
                method = f"{owner if node.value.id in ('self', 'cls') else node.value.id}.{node.attr}"
                if method in definitions:
                    todo.append(method)
    return found


def test_nothing_before_the_accelerator_logs_through_accelerate():
    """Everything parse_args reaches in the five scripts (argument checks, data-folder readers, the output-dir
    lock), and every script function tools/precompute_latents.py (which has no Accelerator) uses."""
    from conftest import REPO

    for module in ALL_MODULES:
        assert accelerate_logger_uses(module.__file__, ["parse_args"]) == {}, module.__name__
    tool = parsed(str(REPO / "tools" / "precompute_latents.py"))
    aliases = {"source": lcd, "sdxl_script": sdxl, "bk": bk}
    used = {}
    for node in ast.walk(tool):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.setdefault(aliases[node.value.id], set()).add(node.attr)
    assert {"ShardStream", "ImageFolderStream", "read_image_folder"} <= set().union(*used.values())
    for module, names in used.items():
        assert accelerate_logger_uses(module.__file__, names) == {}, module.__name__
    # the checker does see a call: the run's own start (after the Accelerator) logs through accelerate
    assert "start_run" in accelerate_logger_uses(lcd.__file__, ["start_run"])


@pytest.mark.parametrize("module", ALL_MODULES, ids=lambda m: m.__name__)
def test_unlockable_output_dir_warns_in_one_line_before_the_accelerator(module, monkeypatch, tmp_path, caplog):
    """A file system without locks (some NFS mounts) while the arguments are checked: one warning, no crash."""
    import fcntl

    from accelerate.state import AcceleratorState

    def no_locks(*_):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level(logging.WARNING):
        module.OutputDirLock.acquire(None, str(tmp_path / "out"))
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot lock --output_dir {tmp_path / 'out'} (No locks available): nothing stops a second run from "
        "writing into it"]
    assert os.path.realpath(tmp_path / "out") not in module.OutputDirLock.held
