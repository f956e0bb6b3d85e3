"""tools/precompute_latents.py and the shard-fed scripts reading its shards: what it writes, that a run on
precomputed latents takes the same first step as one on the raw images (same seed, flips, empty prompts),
and the one-line refusals of shards made otherwise than the run."""

import io
import itertools
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import precompute_latents as tool
import train_lcm_distill_sd_wds as lcd
from conftest import run_in_process

SCRIPTS = ("train_lcm_distill_sd_wds.py", "train_lcm_distill_lora_sd_wds.py", "train_lcm_distill_sdxl_wds.py",
           "train_bk_sdm_kd.py")


def precompute(capsys, *flags):
    """Run the tool in this process; its two-line summary (what it wrote, then what it skipped)."""
    tool.main([str(f) for f in flags])
    return capsys.readouterr().out.strip().splitlines()[-2:]


def members_of(path):
    """{key: {suffix: bytes}} of a shard."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def made(assets, tmp_path_factory):
    """The toy shards precomputed three ways (centre crop + mirror images, float32): with caption embeddings,
    without them, and at another resolution. Same shard layout as the raw shards (2 x 6), so a run reads the
    same samples in the same order from either."""
    root = tmp_path_factory.mktemp("precomputed")
    common = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
              "--center_crop", "--random_flip", "--latent_dtype", "float32", "--samples_per_shard", "6",
              "--batch_size", "4", "--device", "cpu"]
    made = {}
    for name, extra in (("embeds", ["--text_embeddings", "--resolution", "64"]), ("plain", ["--resolution", "64"]),
                        ("at32", ["--resolution", "32"])):
        tool.main([*common, *extra, "--output_dir", str(root / name)])
        made[name] = str(root / name / "latents-{000000..000001}.tar")
    made["root"] = root
    return made


# ---- the tool ------------------------------------------------------------------------------------------------


def test_tool_writes_the_vae_posterior_of_the_scripts_crop(made, assets):
    from diffusers import AutoencoderKL

    shards = sorted(Path(made["root"], "embeds").glob("latents-*.tar"))
    assert [p.name for p in shards] == ["latents-000000.tar", "latents-000001.tar"]
    samples = {**members_of(shards[0]), **members_of(shards[1])}
    assert len(samples) == 12
    key, sample = sorted(samples.items())[0]
    assert set(sample) == {"latent_mean.npy", "latent_std.npy", "prompt_embeds.npy", "txt", "json", "latents.json"}
    mean, std, embeds = (npy(sample[f"{n}.npy"]) for n in ("latent_mean", "latent_std", "prompt_embeds"))
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == np.float32
    assert embeds.shape == (77, 32)
    record = json.loads(sample["latents.json"])
    assert record["format_version"] == lcd.PRECOMPUTED_FORMAT_VERSION
    assert record["resolution"] == 64 and record["center_crop"] and record["views"] == 2
    assert record["interpolation"] == "bilinear" and record["latent_dtype"] == "float32"
    assert record["text_embeddings"] == "sd" and len(record["text_encoders"]) == 1
    assert record["vae"]["name"].endswith("vae") and len(record["vae"]["fingerprint"]) == 16

    # the raw sample, as the scripts decode it: same caption, json kept, the VAE's own mean/std of the crop
    raw = members_of(Path(assets["shard_paths"][0]))[key]
    assert sample["txt"] == raw["txt"] and sample["json"] == raw["json"]
    from PIL import Image

    image = lcd.to_rgb(Image.open(io.BytesIO(raw["png"])))
    pixels, original_size, crop = lcd.ImageTransform(64, center_crop=True)(image, random.Random(0))
    assert record["image_size"] == record["original_size"] == list(original_size) and record["crop_top_left"] == list(crop)
    vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
    with torch.no_grad():
        dist = vae.encode(torch.stack([pixels, torch.flip(pixels, dims=[-1])])).latent_dist
    torch.testing.assert_close(torch.from_numpy(mean), dist.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(std), dist.std, rtol=1e-5, atol=1e-6)
    assert record["vae"]["fingerprint"] == lcd.vae_fingerprint(vae)


def test_tool_skips_and_counts_a_corrupt_image_of_a_folder(assets, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(assets["images"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "broken"}) + "\n")
    summary = precompute(capsys, "--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", folder,
                         "--resolution", "32", "--output_dir", tmp_path / "out", "--device", "cpu", "--seed", "3")
    assert summary == [f"wrote 12 samples in 1 shard: {tmp_path / 'out' / 'latents-{000000..000000}.tar'}",
                       "skipped 1 unreadable, 0 filtered, 0 with malformed metadata"]
    samples = members_of(tmp_path / "out" / "latents-000000.tar")
    assert sorted(samples) == [f"{i:05d}" for i in range(12)]
    record = json.loads(samples["00004"]["latents.json"])
    assert npy(samples["00004"]["latent_mean.npy"]).shape == (1, 4, 4, 4)
    assert npy(samples["00004"]["latent_mean.npy"]).dtype == np.float16  # the default
    assert not record["center_crop"] and record["crop_seed"] == 3 and record["text_encoders"] is None
    from PIL import Image

    # the random crop is drawn once, from the seed and the key
    image = lcd.to_rgb(Image.open(folder / "00004.png"))
    _, _, crop = lcd.ImageTransform(32)(image, random.Random("3-00004"))
    assert record["crop_top_left"] == list(crop)
    assert samples["00004"]["txt"].decode() == json.loads((folder / "metadata.jsonl").read_text().splitlines()[4])["text"]


def test_tool_counts_unreadable_shard_data_and_refuses_bad_flags(assets, tmp_path, capsys):
    summary = precompute(capsys, "--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url",
                         assets["corrupt_shard"], "--resolution", "32", "--output_dir", tmp_path / "out",
                         "--device", "cpu")
    assert summary[0].startswith("wrote 1 sample in 1 shard: ") and summary[1].startswith("skipped 1 unreadable")
    with pytest.raises(SystemExit):
        tool.parse_args(["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url",
                         assets["corrupt_shard"], "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "holds shards of a run with other settings (--resolution 32 there, 512 here)" in err
    assert err.count("\n") == 1
    with pytest.raises(SystemExit):
        tool.parse_args(["--train_shards_path_or_url", assets["corrupt_shard"], "--output_dir", str(tmp_path / "x")])
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_fingerprint_ignores_the_dtype_and_tells_other_weights(assets):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
    fingerprint = lcd.vae_fingerprint(vae)
    for dtype in (torch.bfloat16, torch.float16):
        copy = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae", torch_dtype=dtype)
        assert lcd.vae_fingerprint(copy) == fingerprint
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(1.0)  # the decoder does not make latents
        assert lcd.vae_fingerprint(vae) == fingerprint
        torch.manual_seed(1)
        vae.encoder.conv_in.weight.add_(1e-3 * torch.randn_like(vae.encoder.conv_in.weight))  # a slight fine-tune
    assert lcd.vae_fingerprint(vae) != fingerprint


# ---- the scripts on precomputed shards ------------------------------------------------------------------------


def first_step_loss(script, flags, output_dir):
    run_in_process(script, [*flags, "--output_dir", output_dir])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((Path(output_dir) / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"] if tag.startswith("train/loss")}


def run_flags(assets, shards, *extra):
    return ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url", shards,
            "--resolution", "64", "--center_crop", "--random_flip", "--train_batch_size", "4", "--seed", "0",
            "--shuffle_buffer_size", "4", "--dataloader_num_workers", "0", "--max_train_steps", "1",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--report_to", "tensorboard", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("script, extra, precomputed", [
    # full LCD with caption embeddings precomputed too; half the captions dropped to "" by the run
    ("train_lcm_distill_sd_wds.py", ["--validation_prompts", "--proportion_empty_prompts", "0.5"], "embeds"),
    ("train_bk_sdm_kd.py", ["--validation_steps", "0", "--unet_config_name", "bk_small"], "plain"),
])
def test_same_first_step_loss_as_raw_images(assets, made, tmp_path, script, extra, precomputed):
    raw = first_step_loss(script, run_flags(assets, assets["shards"], *extra), tmp_path / "raw")
    pre = first_step_loss(script, run_flags(assets, made[precomputed], *extra), tmp_path / "pre")
    assert set(raw) == set(pre) and "train/loss" in raw
    assert pre == pytest.approx(raw, rel=1e-4)
    assert raw["train/loss"] > 0


@pytest.mark.slow
def test_lcm_lora_and_sdxl_train_on_precomputed_shards(assets, made, tmp_path, capsys):
    from make_random_pipeline import build_pipeline

    lora = run_in_process("train_lcm_distill_lora_sd_wds.py", run_flags(
        assets, made["embeds"], "--validation_prompts", "--output_dir", tmp_path / "lora", "--report_to", "none",
        "--lora_rank", "4"))
    assert "loss=" in lora.stdout and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    xl = build_pipeline("tiny-sdxl", str(tmp_path / "tiny-sdxl"), seed=0)
    precompute(capsys, "--pretrained_model_name_or_path", xl, "--train_shards_path_or_url", assets["shards"],
               "--resolution", "64", "--center_crop", "--random_flip", "--text_embeddings", "--latent_dtype",
               "float32", "--output_dir", tmp_path / "xl_latents", "--device", "cpu")
    sample = next(iter(members_of(tmp_path / "xl_latents" / "latents-000000.tar").values()))
    assert npy(sample["pooled_prompt_embeds.npy"]).ndim == 1
    assert json.loads(sample["latents.json"])["text_embeddings"] == "sdxl"
    flags = run_flags(assets, str(tmp_path / "xl_latents" / "latents-000000.tar"), "--validation_prompts",
                      "--report_to", "none", "--output_dir", tmp_path / "xl", "--proportion_empty_prompts", "0.5")
    flags[1] = xl
    result = run_in_process("train_lcm_distill_sdxl_wds.py", flags)
    assert "loss=" in result.stdout and (tmp_path / "xl" / "unet_target" / "config.json").is_file()


# ---- refusals ------------------------------------------------------------------------------------------------


def test_other_resolution_is_refused_in_one_line_naming_both(assets, made, tmp_path):
    flags = run_flags(assets, made["plain"], "--validation_prompts", "--output_dir", tmp_path / "run")
    flags[flags.index("--resolution") + 1] = "32"  # the shards were made at 64
    result = run_in_process("train_lcm_distill_sd_wds.py", flags, check=False)
    assert result.returncode == 1
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("error: ") and "--resolution 64, but this run has --resolution 32" in line, line
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def check_line(args, vae, text_encoders):
    with pytest.raises(SystemExit) as excinfo:
        lcd.check_precomputed_data(args, vae, text_encoders)
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_other_vae_text_encoder_crop_or_no_mirror_are_refused(assets, made):
    from argparse import Namespace

    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae", torch_dtype=torch.float16)
    text_encoder = CLIPTextModel.from_pretrained(assets["tiny-sd"], subfolder="text_encoder")
    args = Namespace(train_shards_path_or_url=made["embeds"], shard_read_timeout=10.0, resolution=64,
                     center_crop=True, interpolation_type="bilinear", random_flip=True)
    lcd.check_precomputed_data(args, vae, [text_encoder])  # the run's own models, in fp16 too: accepted

    other = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(-1)
    assert "VAE weights" in check_line(args, other, [text_encoder])
    other_text = CLIPTextModel.from_pretrained(assets["tiny-sd"], subfolder="text_encoder")
    with torch.no_grad():
        for parameter in other_text.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    assert "text encoder weights" in check_line(args, vae, [other_text])
    line = check_line(Namespace(**{**vars(args), "center_crop": False}), vae, [text_encoder])
    assert "with --center_crop, but this run has random crops" in line
    lcd.check_precomputed_data(Namespace(**{**vars(args), "train_shards_path_or_url": assets["shards"]}), other, [])

    single_view = Path(made["root"]) / "single"
    tool.main(["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url",
               assets["shard_paths"][0], "--center_crop", "--resolution", "64", "--output_dir", str(single_view),
               "--device", "cpu"])
    line = check_line(Namespace(**{**vars(args), "train_shards_path_or_url": str(single_view / "latents-000000.tar")}),
                      vae, [])
    assert "no mirror images" in line and "--random_flip" in line


def test_mixed_shards_are_a_data_error(assets, made):
    def stream(urls):
        return lcd.ShardStream(urls, 4, lcd.ImageTransform(64, center_crop=True, random_flip=True),
                               shuffle_buffer_size=0)

    batches = list(itertools.islice(stream(lcd.expand_shard_urls(made["embeds"])), 3))
    assert set(batches[0]) >= {"latent_mean", "latent_std", "prompt_embeds", "captions_dropped"}
    assert batches[0]["latent_mean"].shape == (4, 4, 8, 8) and "pixel_values" not in batches[0]
    for urls in ([lcd.expand_shard_urls(made["embeds"])[0], assets["shard_paths"][1]],
                 [lcd.expand_shard_urls(made["plain"])[0], lcd.expand_shard_urls(made["at32"])[1]]):
        with pytest.raises(lcd.DataError, match="mixed shards") as excinfo:
            list(itertools.islice(stream(urls), 4))
        assert "\n" not in str(excinfo.value)


# ---- stopped runs (issue 21): Ctrl-C and a full disk keep the complete shards, and a rerun continues ------------


def plain_flags(assets, output_dir):
    """The flags of made["plain"]: 12 samples, 6 per shard, batches of 4."""
    return ["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url", assets["shards"],
            "--center_crop", "--random_flip", "--latent_dtype", "float32", "--samples_per_shard", "6",
            "--batch_size", "4", "--device", "cpu", "--resolution", "64", "--output_dir", str(output_dir)]


def shard_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).glob("latents-*.tar"))}


def test_interrupted_run_keeps_complete_shards_only_and_a_rerun_continues(assets, made, tmp_path, capsys,
                                                                         monkeypatch):
    out, batches = tmp_path / "out", []
    encode_batch = tool.encode_batch

    def interrupted(args, vae, encode, batch):
        batches.append([item["key"] for item in batch])
        if len(batches) == 4:  # Ctrl-C with 4 samples of the second shard written to its temporary file
            raise KeyboardInterrupt
        return encode_batch(args, vae, encode, batch)

    monkeypatch.setattr(tool, "encode_batch", interrupted)
    with pytest.raises(SystemExit) as stopped:
        tool.main(plain_flags(assets, out))
    assert stopped.value.code == 130
    assert [len(keys) for keys in batches] == [4, 2, 4, 2]  # a batch never spans two shards
    assert sorted(path.name for path in out.iterdir()) == ["latents-000000.tar", "latents-progress.json"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: kept 1 complete shard (6 samples, {out}/latents-{{000000..000000}}.tar): rerun the same "
        "command to continue after them")
    monkeypatch.undo()
    tool.main(plain_flags(assets, out))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f"continuing {out} after its 1 complete shard (6 samples), from input sample 6"
    assert printed[-2:] == [f"wrote 12 samples in 2 shards: {out}/latents-{{000000..000001}}.tar",
                            "skipped 0 unreadable, 0 filtered, 0 with malformed metadata"]
    # the shards of one uninterrupted run, byte for byte
    assert shard_bytes(out) == shard_bytes(Path(made["plain"]).parent)
    tool.main(plain_flags(assets, out))  # complete: nothing to do (and no model loaded)
    assert capsys.readouterr().out.startswith(f"nothing to do: {out} holds the complete output of this command, "
                                              "12 samples in 2 shards: ")


def test_full_disk_is_one_line_naming_the_file_and_what_is_kept(assets, made, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    addfile = tarfile.TarFile.addfile

    def fills_up(tar, info, fileobj=None):
        if info.name.startswith("00008."):  # the third sample of the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tar.name)
        return addfile(tar, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", fills_up)
    with pytest.raises(SystemExit) as failed:
        tool.main(plain_flags(assets, out))
    assert failed.value.code == (
        f"error: cannot write {out}/latents-000001.tar.tmp (disk full); kept 1 complete shard (6 samples, "
        f"{out}/latents-{{000000..000000}}.tar): free some space, then rerun the same command to continue after them")
    assert failed.value.__suppress_context__  # no chained traceback
    assert sorted(path.name for path in out.iterdir()) == ["latents-000000.tar", "latents-progress.json"]
    monkeypatch.undo()
    tool.main(plain_flags(assets, out))
    assert shard_bytes(out) == shard_bytes(Path(made["plain"]).parent)
