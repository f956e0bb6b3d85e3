"""Tests for the offline fixtures tools: tools/make_random_pipeline.py, tools/make_toy_dataset.py,
tools/make_wds_shards.py.

The dataset and shard tools run once through their CLI in a subprocess, as a user would (they
import only Pillow); the pipeline tool's CLI entry point runs in this process, because a fresh
Python process re-imports torch/diffusers, minutes on a busy 2-core machine. Everything else
calls the functions directly. Pipelines are built once per module and shared.
"""

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS_DIR) not in sys.path:  # pytest.ini adds it too; this keeps the file runnable alone
    sys.path.insert(0, str(TOOLS_DIR))

import make_random_pipeline  # noqa: E402
import make_toy_dataset  # noqa: E402
import make_wds_shards  # noqa: E402

# Offline by construction; these make any accidental hub access fail instead of hanging.
# One OpenMP thread: see conftest.single_threaded_torch.
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS="1")
CAPTION = "a photo of a red circle"


def run_tool(script, *args):
    """Run ``tools/<script>`` as a CLI; return the CompletedProcess (never raises on failure)."""
    return subprocess.run(
        [sys.executable, str(TOOLS_DIR / script), *map(str, args)],
        capture_output=True, text=True, env=OFFLINE_ENV, timeout=600,
    )


def load_weights(pipeline_dir):
    """{component/tensor name: tensor} over every safetensors file of a pipeline directory."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(pipeline_dir).glob("*/*.safetensors")):
        for name, tensor in load_file(path).items():
            weights[f"{path.parent.name}/{name}"] = tensor
    return weights


# ----------------------------------------------------------------------------------------------
# make_random_pipeline
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """``get(preset) -> Path``: each tiny preset built once (seed 0) per module.

    tiny-sd goes through the CLI's ``main(argv)`` (argument parsing, message), in this process: a
    fresh Python process would re-import torch and diffusers, minutes on a busy 2-core machine.
    """
    root = tmp_path_factory.mktemp("pipelines")
    cache = {}

    def get(preset):
        if preset not in cache:
            output_dir = root / preset
            if preset == "tiny-sd":
                import contextlib
                import io

                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    returncode = make_random_pipeline.main(
                        ["--preset", "tiny-sd", "--output_dir", str(output_dir), "--seed", "0"])
                assert returncode == 0
                assert "wrote tiny-sd (seed 0, float32)" in printed.getvalue()
            else:
                assert make_random_pipeline.build_pipeline(preset, str(output_dir), seed=0) == str(output_dir)
            cache[preset] = output_dir
        return cache[preset]

    return get


def check_pipeline_loads_and_generates(output_dir, preset):
    """Load a tiny pipeline dir in its diffusers class, check its traits, generate a 64x64 image."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    is_xl = preset == "tiny-sdxl"
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if is_xl:
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert {p.name for p in output_dir.iterdir()} == expected

    pipeline_cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is pipeline_cls
    assert pipe.vae_scale_factor == 8  # like real SD: 64 px images <-> 8x8 latents

    # The preset's defining traits survived save/load.
    expected_prediction = "v_prediction" if preset == "tiny-sd2" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_prediction
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)
    if is_xl:
        unet = pipe.unet.config
        assert unet.addition_embed_type == "text_time"
        hidden_sizes = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert unet.cross_attention_dim == hidden_sizes
        assert unet.projection_class_embeddings_input_dim == (
            6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
    else:
        assert pipe.unet.config.down_block_types == list(make_random_pipeline.SD1_DOWN)
        assert pipe.unet.config.use_linear_projection == (preset == "tiny-sd2")
        assert pipe.safety_checker is None
    # CLIP pools at the first eos id: it must be the id the tokenizer emits.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id

    images = pipe(
        CAPTION, num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_tiny_pipeline_loads_and_generates(pipeline_dirs, preset):
    check_pipeline_loads_and_generates(pipeline_dirs(preset), preset)


def test_real_size_parameter_counts():
    """Real shapes, counted on the meta device (no memory, no init)."""
    count = make_random_pipeline.count_parameters
    assert count("sd15") == 859_520_964
    assert count("sd15", "text_encoder") == 123_060_480  # CLIP ViT-L/14 text tower
    assert count("sd21") == 865_910_724
    assert count("sdxl") == 2_567_463_684
    assert count("sdxl", "text_encoder_2") == 694_659_840  # OpenCLIP bigG text tower + projection
    assert count("sd15", "vae") == 83_653_863
    assert 30e6 <= count("small-sd") <= 80e6


def test_preset_descriptions_are_consistent():
    for name, spec in make_random_pipeline.PRESETS.items():
        assert spec["description"] and spec["pipeline"] in make_random_pipeline.PIPELINE_CLASSES, name
        # Four VAE levels = three downsamplings = SD's scale factor of 8.
        assert len(spec["vae"]["block_out_channels"]) == 4, name
        assert spec["scheduler"]["config"]["beta_schedule"] == "scaled_linear", name
        if "text_encoder_2" in spec:
            unet, te1, te2 = spec["unet"], spec["text_encoder"], spec["text_encoder_2"]
            assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"], name
            expected = 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
            assert unet["projection_class_embeddings_input_dim"] == expected, name
        else:
            assert spec["unet"]["cross_attention_dim"] == spec["text_encoder"]["hidden_size"], name
    with pytest.raises(ValueError, match="unknown preset"):
        make_random_pipeline.get_preset("sd3")


def test_pipeline_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        make_random_pipeline.main(["--preset", "nope", "--output_dir", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err.strip().splitlines()[-1]

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(SystemExit):
        make_random_pipeline.main(["--preset", "tiny-sd", "--output_dir", str(tmp_path / "busy")])
    assert "not empty" in capsys.readouterr().err.strip().splitlines()[-1]


def test_offline_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    make_random_pipeline.make_offline_clip_tokenizer(str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "merges.txt").read_text().strip() == "#version: 0.2"
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 2 * 256 + 2 and "<|startoftext|>" in vocab and "a</w>" in vocab

    for cls in (CLIPTokenizer, AutoTokenizer):
        tokenizer = cls.from_pretrained(tmp_path / "tok")
        assert tokenizer.model_max_length == 77
        ids = tokenizer(CAPTION, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:ids.index(tokenizer.eos_token_id)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
        # Overlong prompts are truncated to 77 and still end with eos (what SD pipelines rely on).
        long_ids = tokenizer("circle " * 100, max_length=77, truncation=True).input_ids
        assert len(long_ids) == 77 and long_ids[-1] == tokenizer.eos_token_id

    sd2_style = make_random_pipeline.make_offline_clip_tokenizer(str(tmp_path / "tok2"), pad_token="!")
    assert sd2_style.pad_token == "!" and sd2_style.pad_token_id != sd2_style.eos_token_id


# ----------------------------------------------------------------------------------------------
# make_toy_dataset
# ----------------------------------------------------------------------------------------------


def read_captions(folder, mode):
    """{file_name: caption} from a toy dataset in caption layout ``mode``."""
    if mode == "txt":
        return {p.with_suffix(".png").name: p.read_text().strip() for p in folder.glob("*.txt")}
    if mode == "jsonl":
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    else:
        with open(folder / "metadata.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    assert all(set(row) == {"file_name", "text", "aesthetic", "pwatermark"} for row in rows)
    return {row["file_name"]: row["text"] for row in rows}


@pytest.mark.parametrize("mode", ["txt", "jsonl", "csv"])
def test_toy_dataset_caption_modes(tmp_path, mode):
    records = make_toy_dataset.make_toy_dataset(str(tmp_path / mode), num_images=6, seed=3, captions=mode)
    folder = tmp_path / mode
    assert len(records) == 6
    assert read_captions(folder, mode) == {r["file_name"]: r["text"] for r in records}
    assert any(r["width"] != r["height"] for r in records)
    for r in records:
        assert r["text"] == f"a {r['color']} {r['shape']} on a {r['background']} background"
        with Image.open(folder / r["file_name"]) as image:
            assert image.size == (r["width"], r["height"]) and image.mode == "RGB"
            assert 96 <= min(image.size) and max(image.size) <= 128
    # Images depend on the seed only, not on the caption layout.
    again = make_toy_dataset.make_toy_dataset(str(tmp_path / "again"), num_images=6, seed=3, captions="txt")
    assert again == records
    assert all((tmp_path / "again" / r["file_name"]).read_bytes() == (folder / r["file_name"]).read_bytes()
               for r in records)


def test_toy_dataset_cli(tmp_path):
    result = run_tool("make_toy_dataset.py", "--output_dir", tmp_path / "ds", "--num_images", 3,
                      "--captions", "csv", "--format", "jpg", "--min_side", 64, "--max_side", 80)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == ["00000.jpg", "00001.jpg", "00002.jpg", "metadata.csv"]
    with Image.open(tmp_path / "ds" / "00000.jpg") as image:
        assert image.format == "JPEG" and 64 <= min(image.size) and max(image.size) <= 80

    result = run_tool("make_toy_dataset.py", "--output_dir", tmp_path / "bad", "--min_side", 90, "--max_side", 80)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("make_toy_dataset.py: error: need 8 <= --min_side")


# ----------------------------------------------------------------------------------------------
# make_wds_shards
# ----------------------------------------------------------------------------------------------


def read_shards_with_webdataset(urls):
    import webdataset as wds

    samples = []
    for sample in wds.WebDataset([str(u) for u in urls], shardshuffle=False).decode("pil"):
        if "__key__" in sample:  # webdataset 1.x yields an empty end-of-shard marker
            samples.append(sample)
    return samples


def test_shards_round_trip_with_webdataset(tmp_path):
    records = make_toy_dataset.make_toy_dataset(str(tmp_path / "ds"), num_images=10, seed=1, captions="jsonl")
    result = make_wds_shards.make_shards(str(tmp_path / "ds"), str(tmp_path / "shards"), samples_per_shard=4)
    assert result["kept"] == 10 and result["skipped"] == {} and result["num_skipped"] == 0
    assert [Path(p).name for p in result["shards"]] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert result["url_pattern"].endswith("shard-{00000..00002}.tar")

    samples = read_shards_with_webdataset(result["shards"])
    by_name = {r["file_name"]: r for r in records}
    assert len(samples) == 10
    for sample in samples:
        assert "." not in sample["__key__"]
        info = sample["json"]
        record = by_name[info["file_name"]]
        assert sample["txt"] == info["caption"] == record["text"]
        assert (info["width"], info["height"]) == sample["png"].size == (record["width"], record["height"])
        assert (info["aesthetic"], info["pwatermark"]) == (record["aesthetic"], record["pwatermark"])

    # Bytes are stored as-is, and the same input gives byte-identical shards.
    with tarfile.open(result["shards"][0]) as tar:
        assert tar.extractfile("00000.png").read() == (tmp_path / "ds" / "00000.png").read_bytes()
        assert all(member.mtime == 0 for member in tar.getmembers())
    again = make_wds_shards.make_shards(str(tmp_path / "ds"), str(tmp_path / "again"), samples_per_shard=4)
    assert [Path(p).read_bytes() for p in again["shards"]] == [Path(p).read_bytes() for p in result["shards"]]

    # Shuffling changes the order across shards, never the content.
    shuffled = make_wds_shards.make_shards(str(tmp_path / "ds"), str(tmp_path / "shuffled"),
                                           samples_per_shard=4, shuffle=True, seed=0)
    keys = [s["__key__"] for s in read_shards_with_webdataset(shuffled["shards"])]
    assert sorted(keys) == sorted(s["__key__"] for s in samples) and keys != sorted(keys)


def test_shards_cli_csv_metadata(tmp_path):
    make_toy_dataset.make_toy_dataset(str(tmp_path / "ds"), num_images=5, seed=2, captions="csv")
    # A custom caption column, as --caption_column names it.
    with open(tmp_path / "ds" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "ds" / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "prompt", "aesthetic"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "prompt": "P " + r["text"], "aesthetic": r["aesthetic"]}
                         for r in rows)

    result = run_tool("make_wds_shards.py", "--input_dir", tmp_path / "ds", "--output_dir", tmp_path / "out",
                      "--caption_column", "prompt", "--prefix", "train")
    assert result.returncode == 0, result.stderr
    url_pattern = f"{tmp_path / 'out'}/train-{{00000..00000}}.tar"
    assert result.stdout.strip().splitlines() == [f"kept 5 samples in 1 shard: {url_pattern}"]
    with tarfile.open(tmp_path / "out" / "train-00000.tar") as tar:
        info = json.load(tar.extractfile("00000.json"))
        assert tar.extractfile("00000.txt").read().decode() == "P " + rows[0]["text"]
    assert info["caption"] == "P " + rows[0]["text"] and isinstance(info["aesthetic"], float)

    # Rerunning into the same place needs --overwrite (stale shards would mix with new ones)...
    result = run_tool("make_wds_shards.py", "--input_dir", tmp_path / "ds", "--output_dir", tmp_path / "out",
                      "--prefix", "train")
    assert result.returncode == 2 and "--overwrite" in result.stderr.strip().splitlines()[-1]
    # ... which replaces every old shard of that prefix, so none outlives a smaller rerun.
    (tmp_path / "out" / "train-00007.tar").write_bytes(b"stale")
    (tmp_path / "out" / "other-00000.tar").write_bytes(b"not ours")
    make_wds_shards.make_shards(str(tmp_path / "ds"), str(tmp_path / "out"), prefix="train",
                                caption_column="prompt", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other-00000.tar", "train-00000.tar"]


def test_shard_filters_count_skips(tmp_path):
    folder = tmp_path / "ds"
    make_toy_dataset.make_toy_dataset(str(folder), num_images=4, seed=0, captions="txt")
    rng = np.random.default_rng(0)
    # Valid but tiny file (solid colour compresses to well under 200 bytes).
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "few_bytes.png")
    # Valid, noisy (so > 200 bytes), but its shorter side is below --min_size.
    Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8)).save(folder / "small.png")
    # Not an image at all, and a truncated real PNG.
    (folder / "garbage.png").write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    (folder / "truncated.png").write_bytes((folder / "00000.png").read_bytes()[:300])
    # A good image without any caption.
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "uncaptioned.png")
    for name in ("few_bytes", "small", "garbage", "truncated"):
        (folder / f"{name}.txt").write_text("a caption")
    assert (folder / "few_bytes.png").stat().st_size < 200 < (folder / "small.png").stat().st_size

    result = make_wds_shards.make_shards(str(folder), str(tmp_path / "out"), min_size=32, min_bytes=200)
    assert result["kept"] == 4
    assert result["skipped"] == {
        "file smaller than min_bytes=200": 1,
        "shorter side below min_size=32": 1,
        make_wds_shards.REASON_UNREADABLE: 2,
        make_wds_shards.REASON_NO_CAPTION: 1,
    }
    assert result["num_skipped"] == 5
    summary = make_wds_shards.format_summary(result).splitlines()
    assert summary[0].startswith("kept 4 samples in 1 shard:") and len(summary) == 1 + 4


def test_shard_keys_never_contain_dots(tmp_path):
    folder = tmp_path / "ds"
    (folder / "sub.dir").mkdir(parents=True)
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    for rel in ("a.b.png", "a.png", "a.jpg", "sub.dir/x.png"):
        image.save(folder / rel)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": rel, "caption": f"caption of {rel}"}) + "\n"
        for rel in ("a.b.png", "a.png", "a.jpg", "sub.dir/x.png", "missing.png")))
    result = make_wds_shards.make_shards(str(folder), str(folder / "out"))
    assert result["skipped"] == {make_wds_shards.REASON_NO_FILE: 1}
    samples = read_shards_with_webdataset(result["shards"])
    keys = {s["__key__"]: s["json"]["file_name"] for s in samples}
    assert keys == {"a_b": "a.b.png", "a": "a.jpg", "a_2": "a.png", "sub_dir_x": "sub.dir/x.png"}
    assert all(s["txt"] == f"caption of {s['json']['file_name']}" for s in samples)


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(make_wds_shards.NoSamplesError, match="no image files found"):
        make_wds_shards.make_shards(str(tmp_path / "empty"), str(tmp_path / "out"))

    make_toy_dataset.make_toy_dataset(str(tmp_path / "ds"), num_images=2, captions="txt")
    result = run_tool("make_wds_shards.py", "--input_dir", tmp_path / "ds", "--output_dir", tmp_path / "out",
                      "--min_size", 1000)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_wds_shards.py: error: no sample kept")
    assert "shorter side below min_size=1000: 2" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


# ----------------------------------------------------------------------------------------------
# make_random_pipeline through its CLI entry point
# ----------------------------------------------------------------------------------------------


def test_tiny_sd_cli_pipeline_loads_and_generates(pipeline_dirs):
    check_pipeline_loads_and_generates(pipeline_dirs("tiny-sd"), "tiny-sd")


def test_seed_controls_weights(pipeline_dirs, tmp_path):
    """Same seed -> identical weights (also CLI vs function); another seed -> different weights."""
    reference = load_weights(pipeline_dirs("tiny-sd"))  # built by the CLI with --seed 0
    same = load_weights(make_random_pipeline.build_pipeline("tiny-sd", str(tmp_path / "seed0"), seed=0))
    other = load_weights(make_random_pipeline.build_pipeline("tiny-sd", str(tmp_path / "seed1"), seed=1))

    assert reference.keys() == same.keys() == other.keys()
    assert all(reference[name].equal(same[name]) for name in reference)
    for component in ("unet", "vae", "text_encoder"):
        names = [n for n in reference if n.startswith(component + "/") and reference[n].numel() > 1
                 and reference[n].std() > 0]  # skip constant inits (norm weights, zero biases)
        assert names
        assert not any(reference[n].equal(other[n]) for n in names), component
