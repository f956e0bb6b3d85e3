"""train_dreambooth_lora.py: the loss and the example schedule against independent formulas, the image folder
rules, and end-to-end runs as a user makes them. The main run goes through `accelerate launch`; its variants
run in process (see conftest)."""

import contextlib
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth_lora as db
from conftest import REPO, rejection_line, run_in_process, run_script

sys.path.insert(0, str(REPO / "tools"))
from make_toy_dataset import make_toy_dataset  # noqa: E402

SCRIPT = "train_dreambooth_lora.py"
INSTANCE_PROMPT = "a photo of sks circle"


# ----------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------


def test_example_schedule_is_a_permutation_per_epoch_split_over_ranks():
    num_examples, batch_size, world = 5, 2, 2
    permutations = {}
    seen = []
    for batch_index in range(5):  # 5 batches x 2 ranks x 2 = 20 positions = 4 epochs
        for rank in range(world):
            positions = db.example_positions(batch_index, batch_size, rank, world)
            seen += [(p, db.example_at(p, num_examples, 0, permutations)) for p in positions]
    seen.sort()
    assert [p for p, _ in seen] == list(range(20))  # ranks cover the stream without overlap or gap
    for epoch in range(4):
        assert sorted(e for p, e in seen if p // num_examples == epoch) == list(range(num_examples))
    assert [e for _, e in seen[:5]] != [e for _, e in seen[5:10]]  # each epoch reshuffled


def test_loss_is_instance_mse_plus_weighted_prior_mse():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    ctx = db.DreamBoothContext(unet=unet, noise_scheduler=scheduler, prior_loss_weight=0.7,
                               autocast=contextlib.nullcontext)
    latents, embeds = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 16)
    torch.manual_seed(1)
    loss, terms = db.dreambooth_loss(ctx, latents, {"encoder_hidden_states": embeds}, num_instance=2)
    torch.manual_seed(1)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (4,)).long()
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    with torch.no_grad():
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    instance = ((pred[:2] - velocity[:2]) ** 2).mean()
    prior = ((pred[2:] - velocity[2:]) ** 2).mean()
    torch.testing.assert_close(terms["loss_instance"], instance)
    torch.testing.assert_close(terms["loss_prior"], prior)
    torch.testing.assert_close(loss.detach(), instance + 0.7 * prior)


def test_image_folder_rules(tmp_path):
    """Non-image files skipped, EXIF orientation applied, grayscale and RGBA converted to RGB."""
    Image.new("L", (30, 20), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (30, 20), (255, 0, 0, 100)).save(tmp_path / "alpha.png")
    rotated = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "sub").mkdir()
    paths, skipped = db.list_images(str(tmp_path))
    assert [Path(p).name for p in paths] == ["alpha.png", "gray.png", "phone.jpg"] and skipped == ["notes.txt"]
    images = {Path(p).name: db.load_image(p) for p in paths}
    assert all(image.mode == "RGB" for image in images.values())
    assert images["phone.jpg"].size == (20, 40)


# ----------------------------------------------------------------------------------------------------------
# Start-up errors
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """4 photos of the 'subject', plus a file that is not an image."""
    folder = tmp_path_factory.mktemp("instance")
    source = tmp_path_factory.mktemp("instance_src")
    make_toy_dataset(str(source), num_images=4, seed=3, captions="txt")
    for png in source.glob("*.png"):
        shutil.copy(png, folder / png.name)
    (folder / "notes.txt").write_text("taken on holiday")
    return folder


def parse_error(capsys, argv):
    return rejection_line(db, argv, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--with_prior_preservation", "--class_data_dir", "{tmp}/c"],
         "--with_prior_preservation needs --class_data_dir and --class_prompt"),
        (["--with_prior_preservation", "--class_prompt", "a dog"],
         "--with_prior_preservation needs --class_data_dir and --class_prompt"),
        (["--class_prompt", "a dog"], "--class_data_dir and --class_prompt need --with_prior_preservation"),
        (["--train_text_encoder", "--pre_compute_text_embeddings"],
         "--pre_compute_text_embeddings cannot be used with --train_text_encoder"),
        (["--no_cache", "--pre_compute_text_embeddings"], "--pre_compute_text_embeddings contradicts --no_cache"),
        (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
        (["--rank", "0"], "--rank: must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(assets, instance_dir, capsys, tmp_path, extra, message):
    argv = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", str(instance_dir),
            "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(tmp_path / "o"),
            *[e.format(tmp=tmp_path) for e in extra]]
    assert message in parse_error(capsys, argv)


def test_empty_or_missing_instance_folder_is_one_line_error(assets, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos yet")
    base = ["--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_prompt", INSTANCE_PROMPT]
    assert f"--instance_data_dir: no readable image in {empty}" in parse_error(
        capsys, base + ["--instance_data_dir", str(empty)])
    missing_dir = ["--instance_data_dir", str(tmp_path / "x")]
    assert "--instance_data_dir: no such directory" in parse_error(capsys, base + missing_dir)


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------


def common_flags(model, instance_dir, output_dir):
    return [
        "--pretrained_model_name_or_path", model,
        "--instance_data_dir", instance_dir,
        "--instance_prompt", INSTANCE_PROMPT,
        "--output_dir", output_dir,
        "--resolution", "64",
        "--train_batch_size", "2",
        "--seed", "0",
        "--rank", "4",
    ]


def generate(pipe, prompt=INSTANCE_PROMPT):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def base_pipeline(model):
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def prior_run(assets, instance_dir, tmp_path_factory):
    """Launched: prior preservation (class images generated first), text-encoder LoRA, flips, validation."""
    root = tmp_path_factory.mktemp("dreambooth")
    flags = common_flags(assets["tiny-sd"], instance_dir, root / "run") + [
        "--with_prior_preservation", "--class_data_dir", root / "class", "--class_prompt", "a photo of a circle",
        "--num_class_images", "3", "--sample_batch_size", "2",
        "--train_text_encoder", "--random_flip", "--lora_alpha", "8",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
        "--validation_prompt", "a sks circle on the beach", "--num_validation_images", "2", "--validation_steps", "2",
    ]
    result = run_script(SCRIPT, flags)
    return {"output_dir": root / "run", "class_dir": root / "class", "flags": flags, "log": result.stdout}


@pytest.mark.slow
def test_prior_run_outputs(prior_run):
    out = prior_run["output_dir"]
    assert len(list(prior_run["class_dir"].glob("*.jpg"))) == 3
    assert "generating 3 class images" in prior_run["log"] and "skipped 1 non-image file(s)" in prior_run["log"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert Image.open(out / "validation" / "step_000004.png").size == (2 * 64, 64)
    card = (out / "README.md").read_text()
    assert f'instance_prompt: "{INSTANCE_PROMPT}"' in card and "load_lora_weights" in card
    assert "with prior preservation (3 images of 'a photo of a circle'" in card
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "train/loss_instance", "train/loss_prior"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_prior_run_lora_files_load_and_change_the_image(prior_run, assets):
    out = prior_run["output_dir"]
    diffusers_file = load_file(str(out / db.LORA_WEIGHT_NAME))
    assert {k.split(".")[0] for k in diffusers_file} == {"unet", "text_encoder"}
    assert all(t.dtype == torch.float16 for t in diffusers_file.values())  # --save_precision default
    kohya = load_file(str(out / db.KOHYA_WEIGHT_NAME))
    assert any(k.startswith("lora_unet_") for k in kohya)
    te_keys = [k for k in kohya if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))

    base = base_pipeline(assets["tiny-sd"])
    before = generate(base)
    base.load_lora_weights(str(out))
    assert any("lora" in name for name, _ in base.text_encoder.named_parameters()), "text-encoder LoRA not loaded"
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-3
    other = base_pipeline(assets["tiny-sd"])
    other.load_lora_weights(str(out), weight_name=db.KOHYA_WEIGHT_NAME)
    np.testing.assert_allclose(generate(other), with_lora, atol=1e-4)  # kohya folds alpha/r: float rounding


@pytest.mark.slow
def test_second_run_reuses_class_images_and_caches_everything(prior_run, assets, instance_dir, tmp_path):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in prior_run["class_dir"].iterdir())
    flags = common_flags(assets["tiny-sd"], instance_dir, tmp_path / "again") + [
        "--with_prior_preservation", "--class_data_dir", prior_run["class_dir"],
        "--class_prompt", "a photo of a circle",
        "--num_class_images", "3", "--random_flip", "--max_train_steps", "1", "--report_to", "none",
        "--pre_compute_text_embeddings",
    ]
    result = run_in_process(SCRIPT, flags)
    assert "generating" not in result.stdout
    assert sorted((p.name, p.stat().st_mtime_ns) for p in prior_run["class_dir"].iterdir()) == before
    assert ("cached 4 instance and 3 class latents (19 crops, with mirror images), and the embeddings of 2 prompts"
            in result.stdout)
    state = load_file(str(tmp_path / "again" / db.LORA_WEIGHT_NAME))
    assert {k.split(".")[0] for k in state} == {"unet"}


def first_step_loss(assets, instance_dir, class_dir, output_dir, extra):
    flags = common_flags(assets["tiny-sd"], instance_dir, output_dir) + [
        "--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of a circle",
        "--num_class_images", "3", "--random_flip", "--center_crop", "--max_train_steps", "1",
        "--report_to", "tensorboard", *extra,
    ]
    log = run_in_process(SCRIPT, flags).stdout
    assert ("cached 4 instance and 3 class latents" in log) == ("--no_cache" not in extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((Path(output_dir) / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: events.Scalars(tag)[0].value for tag in ("train/loss", "train/loss_instance", "train/loss_prior")}


@pytest.mark.slow
def test_caching_on_and_off_give_the_same_first_step(prior_run, assets, instance_dir, tmp_path):
    cached = first_step_loss(assets, instance_dir, prior_run["class_dir"], tmp_path / "cached", [])
    uncached = first_step_loss(assets, instance_dir, prior_run["class_dir"], tmp_path / "uncached", ["--no_cache"])
    assert cached == pytest.approx(uncached, rel=1e-5, abs=1e-7)
    assert cached["train/loss_prior"] > 0


@pytest.fixture(scope="module")
def six_steps(assets, instance_dir, tmp_path_factory):
    """v-prediction model, 6 steps, a checkpoint every 2 steps, at most 2 kept (the diffusers test case)."""
    output_dir = tmp_path_factory.mktemp("six") / "run"
    flags = common_flags(assets["tiny-sd2"], instance_dir, output_dir) + [
        "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
        "--save_precision", "fp32", "--report_to", "none", "--random_flip",
    ]
    run_in_process(SCRIPT, flags)
    return {"output_dir": output_dir, "flags": flags}


@pytest.mark.slow
def test_rotation_keeps_the_last_two(six_steps):
    assert sorted(p.name for p in six_steps["output_dir"].glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(six_steps, tmp_path):
    original = six_steps["output_dir"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(original / "checkpoint-4", resumed / "checkpoint-4")
    flags = [str(resumed) if str(f) == str(original) else str(f) for f in six_steps["flags"]]
    assert str(resumed) in flags
    result = run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "latest"])
    assert "resuming from" in result.stdout
    expected, got = load_file(str(original / db.LORA_WEIGHT_NAME)), load_file(str(resumed / db.LORA_WEIGHT_NAME))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.slow
def test_resume_to_more_steps_rotates_from_there(six_steps, tmp_path):
    """Resume from checkpoint-4 up to step 8 with limit 2: checkpoints 6 and 8 remain."""
    run_dir = tmp_path / "longer"
    shutil.copytree(six_steps["output_dir"], run_dir)
    flags = [str(run_dir) if str(f) == str(six_steps["output_dir"]) else str(f) for f in six_steps["flags"]]
    flags[flags.index("--max_train_steps") + 1] = "8"
    run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "checkpoint-4"])
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.slow
def test_bf16_lora_stays_fp32_through_validation_and_resume(assets, instance_dir, tmp_path):
    """Frozen weights bf16, LoRA fp32: checkpoint files store the live parameters, so fp32 tensors in the
    checkpoint after a validation pass (and after a resume) show nothing cast them."""
    out = tmp_path / "bf16"
    flags = common_flags(assets["tiny-sd"], instance_dir, out) + [
        "--mixed_precision", "bf16", "--train_text_encoder", "--gradient_checkpointing",
        "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--validation_prompt", "a sks circle", "--num_validation_images", "1", "--validation_steps", "1",
        "--report_to", "none",
    ]
    run_in_process(SCRIPT, flags)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        state = load_file(str(out / checkpoint / db.LORA_WEIGHT_NAME))
        assert {t.dtype for t in state.values()} == {torch.float32}, checkpoint
    shutil.rmtree(out / "checkpoint-2")
    run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "latest"])
    state = load_file(str(out / "checkpoint-2" / db.LORA_WEIGHT_NAME))
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder"}
    # lora_B starts at zero: the text encoder's adapters got gradients through its checkpointed layers
    assert any(t.abs().max() > 0 for k, t in state.items() if k.startswith("text_encoder.") and ".lora_B." in k)


def test_model_card_front_matter_survives_any_prompt(tmp_path):
    import yaml

    prompt = 'a photo of [V] dog: smiling #2 "quoted"'
    from types import SimpleNamespace

    args = SimpleNamespace(pretrained_model_name_or_path="base", instance_prompt=prompt, with_prior_preservation=False,
                           num_class_images=0, class_prompt=None, prior_loss_weight=1.0, rank=4, lora_alpha=4.0,
                           train_text_encoder=False, validation_prompt=None, resolution=512, max_train_steps=10,
                           train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4,
                           lr_scheduler="constant", mixed_precision="fp16", train_data_dir=None,
                           caption_prefix=None, caption_dropout_rate=0.0, noise_offset=0.0, snr_gamma=None,
                           use_dora=False)
    front = db.model_card_text(args, "me/dog").split("---")[1]
    assert yaml.safe_load(front)["instance_prompt"] == prompt


@pytest.mark.slow
def test_class_gap_is_refilled_and_unreadable_images_are_skipped(prior_run, assets, instance_dir, tmp_path):
    """An interrupted generation left a gap (index 1 missing): only that index is generated again. A truncated
    JPEG among the instance photos is skipped with a warning."""
    class_dir = tmp_path / "class"
    shutil.copytree(prior_run["class_dir"], class_dir)
    next(class_dir.glob("00001-*.jpg")).unlink()
    photos = tmp_path / "photos"
    shutil.copytree(instance_dir, photos)
    whole = io.BytesIO()  # headers intact, pixel data cut: passes Image.verify(), fails to decode
    Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")).save(whole, format="JPEG")
    (photos / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    flags = common_flags(assets["tiny-sd"], photos, tmp_path / "out") + [
        "--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of a circle",
        "--num_class_images", "3", "--max_train_steps", "1", "--report_to", "none",
    ]
    result = run_in_process(SCRIPT, flags)
    assert "generating 1 class images" in result.stdout
    assert sorted(p.name.split("-")[0] for p in class_dir.glob("*.jpg")) == ["00000", "00001", "00002"]
    assert "skipped 1 unreadable image(s)" in result.stdout and "truncated.jpg" in result.stdout
    assert "cached 4 instance and 3 class latents" in result.stdout
