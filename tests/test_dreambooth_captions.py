"""train_dreambooth_lora.py on captioned folders, and the loss options users expect from the popular trainers:
min-SNR weighting, offset noise, caption dropout, DoRA. Each against an independent computation; the end-to-end
runs load what they saved into the diffusers pipeline."""

import contextlib
import csv
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import train_dreambooth_lora as db
from conftest import REPO, rejection_line, run_in_process

sys.path.insert(0, str(REPO / "tools"))
from make_toy_dataset import make_toy_dataset  # noqa: E402


def scaled_linear_alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """abar_t of SD's schedule, written out: betas evenly spaced in sqrt, squared, then the running product."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 100, 400, 700, 999])
    abar = scaled_linear_alphas_cumprod()[timesteps.numpy()]
    snr = abar / (1 - abar)
    gamma = 5.0
    expected = np.minimum(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    np.testing.assert_allclose(db.min_snr_weights(scheduler, timesteps, gamma).numpy(), expected, rtol=1e-4)
    # low-noise steps (SNR above gamma) are damped, high-noise ones kept
    weights = db.min_snr_weights(scheduler, timesteps, gamma)
    assert weights[0] < 0.01 and weights[-1] > 0.99 * (snr[-1] / (snr[-1] + 1) if prediction_type == "v_prediction"
                                                        else 1.0)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, norm_num_groups=8,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_weighted_loss_with_offset_noise_against_its_formula(prediction_type):
    """--snr_gamma and --noise_offset together, the prior half included, recomputed step by step."""
    unet = tiny_unet()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    ctx = db.DreamBoothContext(unet=unet, noise_scheduler=scheduler, prior_loss_weight=0.5,
                               autocast=contextlib.nullcontext, noise_offset=0.1, snr_gamma=5.0)
    latents, embeds = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 16)
    torch.manual_seed(7)
    loss, terms = db.dreambooth_loss(ctx, latents, {"encoder_hidden_states": embeds}, num_instance=2)

    torch.manual_seed(7)
    noise = torch.randn_like(latents) + 0.1 * torch.randn(4, 4, 1, 1)  # one shift per example and channel
    timesteps = torch.randint(0, 1000, (4,)).long()
    abar = torch.from_numpy(scaled_linear_alphas_cumprod()).float()[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = abar.sqrt() * noise - (1 - abar).sqrt() * latents if prediction_type == "v_prediction" else noise
    with torch.no_grad():
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    snr = abar.flatten() / (1 - abar.flatten())
    weights = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    per_example = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    instance, prior = (weights[:2] * per_example[:2]).mean(), (weights[2:] * per_example[2:]).mean()
    torch.testing.assert_close(terms["loss_instance"], instance, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss_prior"], prior, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), instance + 0.5 * prior, rtol=2e-4, atol=1e-6)


def test_noise_offset_zero_draws_nothing_extra():
    """Without --noise_offset the random stream is the one runs made before the flag existed."""
    scheduler = DDPMScheduler()
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(3)
    plain = db.noised_latents_and_target(scheduler, latents)
    torch.manual_seed(3)
    zero = db.noised_latents_and_target(scheduler, latents, 0.0)
    after_zero = torch.rand(1)
    torch.manual_seed(3)
    torch.randn_like(latents), torch.randint(0, 1000, (2,))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero)) and torch.equal(after_zero, torch.rand(1))


def test_caption_dropout_rate_over_many_draws():
    draws = [db.caption_dropped(0, position, 0.3) for position in range(20000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.015  # 4.6 standard deviations
    assert draws == [db.caption_dropped(0, position, 0.3) for position in range(20000)]  # by position: resumable
    assert draws != [db.caption_dropped(1, position, 0.3) for position in range(20000)]  # and by seed
    assert not any(db.caption_dropped(0, position, 0.0) for position in range(1000))


# ----------------------------------------------------------------------------------------------------------
# Captioned folders and their errors
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(folder), num_images=4, seed=5, captions="txt")
    return sorted(folder.glob("*.png"))


def folder_with(root, images, kind, captions=None):
    """A captioned folder of `images`: jsonl with columns image/caption, csv with file_name/text, or .txt files."""
    folder = root / kind
    folder.mkdir(parents=True)
    captions = captions or [f"a drawing number {i}" for i in range(len(images))]
    for image in images:
        shutil.copy(image, folder / image.name)
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(
            json.dumps({"image": image.name, "caption": caption, "score": i}) + "\n"
            for i, (image, caption) in enumerate(zip(images, captions))))
    elif kind == "csv":
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "text"])
            writer.writerows([image.name, caption] for image, caption in zip(images, captions))
    else:
        for image, caption in zip(images, captions):
            (folder / f"{image.stem}.txt").write_text(caption + "\n")
    return folder


@pytest.mark.parametrize("kind, columns", [("jsonl", ("image", "caption")), ("csv", ("file_name", "text")),
                                           ("txt", ("file_name", "text"))])
def test_captioned_folders_are_read_with_their_prefix(tmp_path, images, kind, columns):
    folder = folder_with(tmp_path, images, kind)
    paths, captions, missing, not_utf8 = db.read_captioned_folder(str(folder), *columns, caption_prefix="sks style,")
    assert [p.rsplit("/", 1)[-1] for p in paths] == [image.name for image in images] and missing == not_utf8 == []
    assert captions == [f"sks style, a drawing number {i}" for i in range(len(images))]


def test_captioned_folder_errors_are_one_line(assets, tmp_path, images, capsys):
    base = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--output_dir", str(tmp_path / "out")]
    jsonl = folder_with(tmp_path, images, "jsonl")
    message = rejection_line(db, base + ["--train_data_dir", str(jsonl), "--caption_column", "text",
                                         "--image_column", "image"], capsys)
    assert "metadata.jsonl has no column 'text' (columns: image, caption, score); choose one with --caption_column" \
        in message

    uncaptioned = folder_with(tmp_path / "uncaptioned", images, "jsonl", captions=["a", "", "c", "d"])
    message = rejection_line(db, base + ["--train_data_dir", str(uncaptioned), "--image_column", "image",
                                         "--caption_column", "caption"], capsys)
    assert f"metadata.jsonl line 2: image {images[1].name} has no caption in column 'caption'" in message

    sidecars = folder_with(tmp_path, images, "txt")
    (sidecars / f"{images[2].stem}.txt").unlink()
    message = rejection_line(db, base + ["--train_data_dir", str(sidecars)], capsys)
    assert f"image {images[2].name} has no caption" in message and f"{images[2].stem}.txt is missing" in message

    both = base + ["--train_data_dir", str(jsonl), "--instance_data_dir", str(jsonl), "--instance_prompt", "x"]
    assert "--instance_data_dir and --train_data_dir are two sources of training images: give one" in \
        rejection_line(db, both, capsys)
    assert "--instance_prompt applies to --instance_data_dir only" in rejection_line(
        db, base + ["--train_data_dir", str(sidecars.parent / "jsonl"), "--instance_prompt", "x",
                    "--image_column", "image", "--caption_column", "caption"], capsys)
    assert "give --instance_data_dir (with --instance_prompt) or --train_data_dir" in rejection_line(db, base, capsys)
    for gamma in ("0", "-1"):
        assert "--snr_gamma: must be > 0" in rejection_line(
            db, base + ["--train_data_dir", str(jsonl), "--image_column", "image", "--caption_column", "caption",
                        "--snr_gamma", gamma], capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@contextlib.contextmanager
def no_accelerate_state():
    """No Accelerator (nor PartialState) exists inside, as when a script parses its arguments."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_listed_but_missing_and_tiny_images_are_one_warning_each(assets, images, tmp_path, caplog, capsys):
    """metadata.jsonl lists 6 images, 3 of them absent and one a 1x1 placeholder: the arguments parse (they
    crashed on accelerate's logger, used before the Accelerator existed), and the examples are the 3 that
    exist, with one warning line naming the first missing image and one naming the smallest image."""
    import logging

    from accelerate import PartialState
    from PIL import Image

    folder = folder_with(tmp_path, images[:2], "jsonl")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "dot.png")
    with open(folder / "metadata.jsonl", "a") as f:
        for name in ("gone-1.png", "dot.png", "gone-2.png", "gone-3.png"):
            f.write(json.dumps({"image": name, "caption": f"a drawing {name}"}) + "\n")
    argv = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", str(folder), "--image_column",
            "image", "--caption_column", "caption", "--resolution", "64", "--output_dir", str(tmp_path / "out")]
    with no_accelerate_state(), caplog.at_level(logging.WARNING):
        args = db.parse_args(argv)
        assert not caplog.records  # start-up only checks: the run warns once, on the main process
        examples = db.DreamBoothExamples(args, PartialState())
    db.OutputDirLock.release_all()
    assert len(examples.instances.images) == 3
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings
    assert (f"3 of 6 images listed in the metadata of {folder} are missing (the first: gone-1.png); training on the "
            f"3 that exist") in warnings[0]
    assert "1 of 3 images in" in warnings[1] and "--resolution 64" in warnings[1]
    assert "(the smallest: dot.png, 1x1)" in warnings[1]

    (folder / "metadata.jsonl").write_text("".join(json.dumps({"image": f"gone-{i}.png", "caption": "x"}) + "\n"
                                                   for i in range(3)))
    with no_accelerate_state():
        message = rejection_line(db, argv, capsys)
    assert message.endswith(f"--train_data_dir: none of the 3 images listed in metadata.jsonl exists under {folder} "
                            f"(the first is gone-0.png)")


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------


def generate(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_captioned_dora_run_saves_files_diffusers_loads(assets, images, tmp_path):
    """jsonl captions, DoRA on the UNet and the text encoder, min-SNR, offset noise and caption dropout: the
    run writes a diffusers file with DoRA magnitudes (and no kohya file) that diffusers loads as saved and
    that changes the base pipeline's image."""
    folder = folder_with(tmp_path, images, "jsonl")
    out = tmp_path / "dora"
    run = run_in_process("train_dreambooth_lora.py", [
        "--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", folder, "--image_column", "image",
        "--caption_column", "caption", "--caption_prefix", "sks", "--caption_dropout_rate", "0.5",
        "--snr_gamma", "5", "--noise_offset", "0.05", "--use_dora", "--train_text_encoder", "--rank", "4",
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "3", "--seed", "0",
        "--learning_rate", "1e-2", "--output_dir", out, "--report_to", "none", "--save_precision", "fp32"])
    assert "4 instance images" in run.stdout
    saved = load_file(str(out / db.LORA_WEIGHT_NAME))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    assert magnitudes and any(k.startswith("text_encoder.") for k in magnitudes)
    assert not (out / db.KOHYA_WEIGHT_NAME).exists() and f"--use_dora: no {db.KOHYA_WEIGHT_NAME}" in run.stdout
    card = (out / "README.md").read_text()
    assert 'instance_prompt: "sks"' in card and "| adapter | DoRA |" in card and "min-SNR, gamma 5.0" in card

    base = StableDiffusionPipeline.from_pretrained(assets["tiny-sd"], safety_checker=None,
                                                   requires_safety_checker=False)
    before = generate(base, "sks a drawing number 1")
    base.load_lora_weights(str(out))
    after = generate(base, "sks a drawing number 1")
    assert np.abs(after - before).max() > 1e-3, "the DoRA file changed nothing"
    # the adapters in the pipeline are the saved tensors: every magnitude vector, of the UNet and of the text
    # encoder, came back as trained
    for key in magnitudes:
        component, module_path = key.split(".", 1)
        module = getattr(base, component).get_submodule(module_path.split(".lora_magnitude_vector")[0])
        loaded = next(v for name, v in module.named_parameters() if "lora_magnitude_vector" in name)
        torch.testing.assert_close(loaded.detach().float().flatten(), saved[key].float().flatten(), msg=key)


def test_txt_captions_are_cached_once_per_distinct_prompt(assets, images, tmp_path):
    """Sidecar captions, two of them equal, and caption dropout: the cache holds each distinct prompt once
    (3 captions + the empty one), and the run resumes bit-identically."""
    folder = folder_with(tmp_path, images, "txt", captions=["a red circle", "a blue square", "a red circle",
                                                             "a green triangle"])
    flags = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", folder,
             "--caption_dropout_rate", "0.25", "--rank", "4", "--resolution", "64", "--train_batch_size", "2",
             "--seed", "0", "--report_to", "none", "--checkpointing_steps", "2", "--random_flip"]
    full = run_in_process("train_dreambooth_lora.py", flags + ["--max_train_steps", "4", "--output_dir",
                                                                tmp_path / "full"])
    assert "and the embeddings of 4 prompts" in full.stdout
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_in_process("train_dreambooth_lora.py", flags + ["--max_train_steps", "4", "--output_dir",
                                                         tmp_path / "resumed", "--resume_from_checkpoint", "latest"])
    a, b = (load_file(str(tmp_path / run / db.LORA_WEIGHT_NAME)) for run in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_auto_buckets_keep_the_area_and_mirror_each_other(resolution):
    buckets = db.resolution_buckets("auto", resolution)
    assert (resolution, resolution) in buckets
    assert {(w, h) for h, w in buckets} == set(buckets)  # every landscape bucket has its portrait twin
    for height, width in buckets:
        assert height % 8 == 0 and width % 8 == 0 and 0.5 <= width / height <= 2.0
        assert 0.8 <= height * width / resolution**2 <= 1.0  # about the pixels of the square, never more


def test_explicit_buckets_and_their_errors():
    assert db.resolution_buckets("512x512, 640X384", 512) == [(384, 640), (512, 512)]
    for spec, message in (("512", "is not WIDTHxHEIGHT"), ("500x512", "multiples of 8")):
        with pytest.raises(ValueError, match=message):
            db.resolution_buckets(spec, 512)


def test_images_go_to_the_bucket_of_the_nearest_aspect_ratio():
    buckets = db.resolution_buckets("auto", 512)
    assert db.nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert db.nearest_bucket(300, 500, buckets) == (384, 640)  # 1.67:1
    assert db.nearest_bucket(1200, 900, buckets) == (576, 448)  # 3:4 portrait -> 1.29 (nearest to 1.33)
    assert db.nearest_bucket(100, 1000, buckets) == (384, 640)  # beyond the widest: the widest


def test_bucket_epochs_deal_full_single_bucket_batches_covering_every_example():
    example_buckets = [(64, 64)] * 5 + [(48, 80)] * 2 + [(80, 48)]
    for epoch in range(3):
        batches = db.bucket_epoch(epoch, example_buckets, 2, seed=0)
        assert len(batches) == 3 + 1 + 1  # ceil(5/2) + ceil(2/2) + ceil(1/2): as many every epoch
        assert all(len(members) == 2 and {example_buckets[i] for i in members} == {bucket}
                   for bucket, members in batches)
        assert set().union(*(members for _, members in batches)) == set(range(8))
        assert batches == db.bucket_epoch(epoch, example_buckets, 2, seed=0)  # deterministic: exact resume
    assert db.bucket_epoch(0, example_buckets, 2, 0) != db.bucket_epoch(1, example_buckets, 2, 0)


def test_transform_to_a_bucket_covers_then_crops():
    from PIL import Image

    image = Image.new("RGB", (300, 100), (200, 10, 10))  # 3:1, wider than the (48, 80) bucket
    pixels, original_size, (top, left) = db.ImageTransform((48, 80), center_crop=True)(image, None)
    assert pixels.shape == (3, 48, 80) and original_size == (100, 300)
    assert top == 0 and left == (144 - 80) // 2  # resized to 48 x 144 (height covers), centred crop
    square = db.ImageTransform(64, center_crop=True)(image, None)
    assert square[0].shape == (3, 64, 64) and square[2] == (0, (192 - 64) // 2)


def bucket_folder(root, kind):
    """Two square and two wide (5:3) pictures with captions, as jsonl or .txt sidecars."""
    from PIL import Image

    root.mkdir(parents=True)
    sizes = {"square-0.png": (64, 64), "square-1.png": (72, 72), "wide-0.png": (160, 96), "wide-1.png": (150, 90)}
    rng = np.random.default_rng(0)
    rows = []
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
        caption = f"a {'square' if name.startswith('square') else 'wide'} picture"
        rows.append({"file_name": name, "text": caption})
        if kind == "txt":
            (root / name.replace(".png", ".txt")).write_text(caption)
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, sizes


def record_batches(monkeypatch):
    """What each training step fed the loss: the latents' shape and, for SDXL, the time_ids."""
    seen = []
    original = db.dreambooth_loss

    def recording_loss(ctx, latents, conditioning, num_instance):
        extra = conditioning.get("added_cond_kwargs", {})
        seen.append((tuple(latents.shape), extra.get("time_ids")))
        return original(ctx, latents, conditioning, num_instance)

    monkeypatch.setattr(db, "dreambooth_loss", recording_loss)
    return seen


def test_sdxl_buckets_batch_one_shape_and_tell_each_image_its_size(tmp_path, monkeypatch):
    """jsonl captions on SDXL with buckets 64x64 and 80x48 (W x H): every batch is one bucket, both buckets
    train, and the time_ids carry each image's true size, its crop and the bucket's size."""
    from make_random_pipeline import build_pipeline

    tiny = build_pipeline("tiny-sdxl", str(tmp_path / "tiny-sdxl"), seed=0)
    folder, sizes = bucket_folder(tmp_path / "data", "jsonl")
    seen = record_batches(monkeypatch)
    run = run_in_process("train_dreambooth_lora.py", [
        "--pretrained_model_name_or_path", tiny, "--train_data_dir", folder, "--resolution", "64",
        "--resolution_buckets", "64x64,80x48", "--rank", "2", "--train_batch_size", "2", "--max_train_steps", "6",
        "--seed", "0", "--report_to", "none", "--random_flip", "--output_dir", tmp_path / "out"])
    assert "aspect-ratio buckets (height x width: instance images): 48x80: 2, 64x64: 2" in run.stdout
    assert {shape for shape, _ in seen} == {(2, 4, 6, 10), (2, 4, 8, 8)}  # latents are 1/8 of the bucket
    true_sizes = {(h, w) for w, h in sizes.values()}
    for shape, time_ids in seen:
        target = (shape[2] * 8, shape[3] * 8)
        for original_h, original_w, top, left, target_h, target_w in time_ids.tolist():
            assert (original_h, original_w) in true_sizes and (target_h, target_w) == target
            is_wide = original_w > original_h
            assert is_wide == (target == (48, 80))  # each image in the bucket of its aspect ratio
            scale = max(target_w / original_w, target_h / original_h)
            assert 0 <= top <= round(original_h * scale) - target_h
            assert 0 <= left <= round(original_w * scale) - target_w


def test_sd_buckets_from_txt_captions_uncached_resume_exactly(assets, tmp_path, monkeypatch):
    """.txt captions, auto buckets, --no_cache: single-bucket batches of both shapes, and a resumed run is
    bit-identical (the bucketed schedule is arithmetic on the step)."""
    folder, _ = bucket_folder(tmp_path / "data", "txt")
    seen = record_batches(monkeypatch)
    flags = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", folder, "--resolution", "64",
             "--resolution_buckets", "auto", "--rank", "2", "--train_batch_size", "2", "--seed", "0",
             "--report_to", "none", "--no_cache", "--checkpointing_steps", "2", "--max_train_steps", "4"]
    run_in_process("train_dreambooth_lora.py", flags + ["--output_dir", tmp_path / "full"])
    assert {shape for shape, _ in seen} == {(2, 4, 6, 10), (2, 4, 8, 8)}  # auto: 48x80 is the 5:3 bucket at 64
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_in_process("train_dreambooth_lora.py", flags + ["--output_dir", tmp_path / "resumed",
                                                        "--resume_from_checkpoint", "latest"])
    a, b = (load_file(str(tmp_path / run / db.LORA_WEIGHT_NAME)) for run in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
