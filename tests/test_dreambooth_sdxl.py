"""train_dreambooth_lora.py on an SDXL base model (tiny random SDXL pipeline): the micro-conditioning of each
training crop, then one run through `accelerate launch` with prior preservation and both text encoders trained,
whose outputs must load into diffusers' SDXL pipeline and reproduce the in-training validation image; resume
runs in process (see conftest)."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth_lora as db
from conftest import run_in_process, run_script
from make_random_pipeline import build_pipeline
from make_toy_dataset import make_toy_dataset

SCRIPT = "train_dreambooth_lora.py"
INSTANCE_PROMPT = "a photo of sks circle"
VALIDATION_PROMPT = "a sks circle on the beach"


class FixedCrop:
    """Stands in for ImageTransform's random generator: the crop lands at (top, left)."""

    def __init__(self, top, left):
        self.values = [top, left]

    def randint(self, low, high):
        value = self.values.pop(0)
        assert low <= value <= high
        return value


class IdentityVAE:
    """Posterior mean = the picture, std = 0: a 'latent' shows which crop (and flip) a use got."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels, std=torch.zeros_like(pixels)))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("xl") / "tiny-sdxl"), seed=0)


def wide_picture():
    """300 x 200 (w x h) with a distinct value per column, so crops are told apart by their pixels."""
    columns = np.linspace(0, 255, 300).astype(np.uint8)
    return Image.fromarray(np.stack([np.tile(columns, (200, 1))] * 3, axis=-1))


# ---- micro-conditioning of the training crops --------------------------------------------------------------


def test_time_ids_carry_the_true_size_and_the_crop_the_picture_shows():
    picture, transform = wide_picture(), db.ImageTransform(64)  # resized to 96 x 64: lefts 0..32
    pixels, original_size, top_left = transform(picture, FixedCrop(0, 10))
    assert original_size == (200, 300) and top_left == (0, 10)
    assert db.crop_time_ids(original_size, top_left, transform, flipped=False).tolist() == [[200, 300, 0, 10, 64, 64]]
    # a mirrored crop is the mirrored picture's crop at the mirrored left edge (96 - 64 - 10)
    mirrored_ids = db.crop_time_ids(original_size, top_left, transform, flipped=True)
    assert mirrored_ids.tolist() == [[200, 300, 0, 22, 64, 64]]
    mirrored = transform(picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), FixedCrop(0, 22))[0]
    torch.testing.assert_close(torch.flip(pixels, dims=[-1]), mirrored, atol=2 / 255, rtol=0)

    # cached: each of the 4 crops (and its mirror image) keeps its own time_ids, and a use gets the ones of the
    # crop it shows; encoded now (--no_cache): the same rule for any crop
    images = db.ImageSet([picture])
    db.cache_latents(IdentityVAE(), images, transform, random_flip=True, num_crops=4)
    assert images.time_ids[0].shape == (2, 4, 6)
    assert images.time_ids[0][0, :, 3].tolist() == [0, 11, 21, 32]
    assert images.time_ids[0][1, :, 3].tolist() == [32, 21, 11, 0]
    assert (images.time_ids[0][..., [0, 1, 2, 4, 5]] == torch.tensor([200.0, 300, 0, 64, 64])).all()
    resized = np.asarray(picture.resize((96, 64), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    for cached in (True, False):
        for flip in (False, True):
            latents, time_ids = db.sample_latents(IdentityVAE(), images, [0] * 40, [flip] * 40, transform,
                                                  list(range(40)), 0, "instance", cached=cached)
            assert time_ids.shape == (40, 6) and len({row[3] for row in time_ids.tolist()}) > 1
            for latent, ids in zip(latents, time_ids):
                left = int(ids[3])
                shown = resized[:, ::-1] if flip else resized  # the picture the UNet sees, mirrored or not
                expected = torch.from_numpy(shown[:, left:left + 64].copy() / 127.5 - 1).permute(2, 0, 1)
                torch.testing.assert_close(latent, expected.float(), atol=1e-5, rtol=0)


def test_sdxl_is_detected_and_gets_its_own_resolution(tiny_sdxl, assets, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    wide_picture().save(instance / "a.png")
    try:
        cases = [(tiny_sdxl, True, 1024, []), (tiny_sdxl, True, 64, ["--resolution", "64"]),
                 (assets["tiny-sd"], False, 512, ["--seed", "1", "--rank", "2"])]
        for model, sdxl, resolution, extra in cases:
            args = db.parse_args(["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance),
                                  "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(tmp_path / str(len(extra))),
                                  *extra])
            assert (args.sdxl, args.resolution) == (sdxl, resolution)
    finally:
        db.OutputDirLock.release_all()


# ---- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, tmp_path_factory):
    root, tiny = tmp_path_factory.mktemp("db_xl"), tiny_sdxl
    instance = root / "instance"
    make_toy_dataset(str(instance), num_images=3, seed=3, captions="txt")
    for caption in instance.glob("*.txt"):
        caption.unlink()
    wide_picture().save(instance / "wide.png")
    flags = [
        "--pretrained_model_name_or_path", tiny, "--instance_data_dir", instance,
        "--instance_prompt", INSTANCE_PROMPT, "--output_dir", root / "run", "--resolution", "64",
        "--train_batch_size", "2", "--seed", "0", "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-3",
        "--with_prior_preservation", "--class_data_dir", root / "class", "--class_prompt", "a photo of a circle",
        "--num_class_images", "2", "--sample_batch_size", "2", "--train_text_encoder", "--random_flip",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_precision", "fp32",
        "--validation_prompt", VALIDATION_PROMPT, "--num_validation_images", "1", "--validation_steps", "0",
        "--report_to", "tensorboard",
    ]
    flags = [str(f) for f in flags]
    result = run_script(SCRIPT, flags)
    from transformers import CLIPTextConfig

    text_layers = CLIPTextConfig.from_pretrained(tiny, subfolder="text_encoder").num_hidden_layers
    return {"root": root, "tiny": tiny, "output_dir": root / "run", "flags": flags, "log": result.stdout,
            "text_layers": text_layers}


def sdxl_pipeline(tiny):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(tiny, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_like(pipe):
    """What the script's validation draws: DPM-Solver++, 25 steps, seed --seed + 0, the training resolution."""
    generator = torch.Generator().manual_seed(0)
    image = pipe(VALIDATION_PROMPT, num_inference_steps=25, height=64, width=64, generator=generator,
                 output_type="np").images[0]
    return np.round(image * 255).astype(np.int16)


@pytest.mark.slow
def test_sdxl_run_outputs_load_into_the_sdxl_pipeline(sdxl_run):
    out, log, tiny = sdxl_run["output_dir"], sdxl_run["log"], sdxl_run["tiny"]
    assert "DreamBooth LoRA (SDXL)" in log and "generating 2 class images" in log
    class_images = sorted((sdxl_run["root"] / "class").glob("*.jpg"))
    assert len(class_images) == 2 and all(Image.open(p).size == (64, 64) for p in class_images)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert all(np.isfinite(events.Scalars("train/loss_prior")[i].value) for i in range(4))

    # the diffusers file: all three adapters, fp32 as asked, alpha kept
    state = load_file(str(out / db.LORA_WEIGHT_NAME))
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    assert {t.dtype for t in state.values()} == {torch.float32}
    # lora_B starts at zero: every adapter got gradients and moved (under DDP one that gets none stops the run;
    # the first text encoder's last layer, which SDXL does not read, has none)
    assert all(t.abs().max() > 0 for k, t in state.items() if "lora_B" in k)
    last_layer = f"layers.{sdxl_run['text_layers'] - 1}."
    assert not any(k.startswith("text_encoder.") and last_layer in k for k in state)
    assert any(k.startswith("text_encoder_2.") and last_layer in k for k in state)

    # the kohya file: SDXL names and the true alpha (not the rank)
    kohya = load_file(str(out / db.KOHYA_WEIGHT_NAME))
    prefixes = {k.split("_text_model")[0] if k.startswith("lora_te") else "lora_unet" for k in kohya}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    names = ("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")
    assert all(k.startswith(names) for k in kohya)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {8.0}
    assert len([k for k in kohya if k.endswith(".alpha")]) == len([k for k in state if "lora_A" in k])

    card = (out / "README.md").read_text()
    assert f"base_model: {tiny}" in card and "- stable-diffusion-xl" in card
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "load_lora_weights" in card

    # loaded by diffusers, the adapters give the image the training run validated with
    validation = np.asarray(Image.open(out / "validation" / "step_000004.png").convert("RGB")).astype(np.int16)
    assert validation.shape == (64, 64, 3)
    base = validation_like(sdxl_pipeline(tiny))
    pipe = sdxl_pipeline(tiny)
    pipe.load_lora_weights(str(out))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert any("lora" in name for name, _ in encoder.named_parameters()), "text-encoder LoRA not loaded"
    loaded = validation_like(pipe)
    assert np.abs(loaded - validation).max() <= 1, "the saved LoRA does not reproduce the in-training validation"
    assert np.abs(base - validation).max() > 2, "the LoRA did not change the image"
    kohya_pipe = sdxl_pipeline(tiny)
    kohya_pipe.load_lora_weights(str(out), weight_name=db.KOHYA_WEIGHT_NAME)
    assert np.abs(validation_like(kohya_pipe) - loaded).max() <= 1  # kohya folds alpha / r: float rounding


@pytest.mark.slow
def test_sdxl_resume_equals_uninterrupted_run(sdxl_run, tmp_path):
    original = sdxl_run["output_dir"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(original / "checkpoint-2", resumed / "checkpoint-2")
    flags = [str(resumed) if f == str(original) else f for f in sdxl_run["flags"]]
    flags[flags.index("--report_to") + 1] = "none"
    result = run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "latest"])
    assert "resuming from" in result.stdout and "generating" not in result.stdout
    expected, got = load_file(str(original / db.LORA_WEIGHT_NAME)), load_file(str(resumed / db.LORA_WEIGHT_NAME))
    assert expected.keys() == got.keys() and any(k.startswith("text_encoder_2.") for k in got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # the rest of the run is the same too: the checkpoint at step 4 and the validation image
    for name in (db.LORA_WEIGHT_NAME,):
        a, b = load_file(str(original / "checkpoint-4" / name)), load_file(str(resumed / "checkpoint-4" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.asarray(Image.open(original / "validation" / "step_000004.png")),
                          np.asarray(Image.open(resumed / "validation" / "step_000004.png")))


def test_sdxl_prompt_table_and_conditioning(tiny_sdxl):
    """Two prompts -> two rows; a batch of 2 instances + 2 classes picks rows 0, 0, 1, 1 and carries the pooled
    embeddings and time_ids the SDXL UNet needs."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tiny = tiny_sdxl
    tokenizers = [CLIPTokenizer.from_pretrained(tiny, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(tiny, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(tiny, subfolder="text_encoder_2")]
    with torch.no_grad():
        table = db.encode_prompt_table(encoders, tokenizers, [INSTANCE_PROMPT, "a photo of a circle"], "cpu")
        one = [e(t([INSTANCE_PROMPT], padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids, output_hidden_states=True) for e, t in zip(encoders, tokenizers)]
    assert table["encoder_hidden_states"].shape == (2, 77, 64) and table["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(table["encoder_hidden_states"][:1],
                               torch.cat([one[0].hidden_states[-2], one[1].hidden_states[-2]], dim=-1))
    torch.testing.assert_close(table["text_embeds"][:1], one[1].text_embeds)
    rows = torch.tensor([0, 0, 1, 1])  # two instance examples, then two class examples
    time_ids = torch.arange(24.0).view(4, 6)
    conditioning = db.unet_conditioning(table, rows, time_ids)
    assert torch.equal(conditioning["encoder_hidden_states"], table["encoder_hidden_states"][[0, 0, 1, 1]])
    assert torch.equal(conditioning["added_cond_kwargs"]["text_embeds"], table["text_embeds"][[0, 0, 1, 1]])
    assert torch.equal(conditioning["added_cond_kwargs"]["time_ids"], time_ids)
    sd_conditioning = db.unet_conditioning({"encoder_hidden_states": table["encoder_hidden_states"]},
                                           torch.tensor([0, 0]), time_ids[:2])
    assert set(sd_conditioning) == {"encoder_hidden_states"} and sd_conditioning["encoder_hidden_states"].shape[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("zeroes_empty_prompt", [True, False])
def test_sdxl_caching_on_and_off_give_the_same_step_and_image(sdxl_run, tmp_path, zeroes_empty_prompt):
    """Cached latents, time_ids and prompt table (text encoders freed, validation from embeddings computed at
    start-up) against everything encoded at each use (text encoders kept): the same first step and image, for a
    base pipeline whose unconditional input is zeros (SDXL base) and for one that encodes "" instead."""
    base = sdxl_run["tiny"]
    if not zeroes_empty_prompt:
        base = tmp_path / "no-zeros"
        shutil.copytree(sdxl_run["tiny"], base)
        index = json.loads((base / "model_index.json").read_text())
        index["force_zeros_for_empty_prompt"] = False
        (base / "model_index.json").write_text(json.dumps(index))

    def one_step(name, extra):
        flags = ["--pretrained_model_name_or_path", base,
                 "--instance_data_dir", sdxl_run["flags"][sdxl_run["flags"].index("--instance_data_dir") + 1],
                 "--instance_prompt", INSTANCE_PROMPT, "--output_dir", tmp_path / name, "--resolution", "64",
                 "--train_batch_size", "2", "--seed", "0", "--rank", "4", "--learning_rate", "1e-2",
                 "--with_prior_preservation", "--class_data_dir", sdxl_run["root"] / "class",
                 "--class_prompt", "a photo of a circle", "--num_class_images", "2", "--random_flip", "--center_crop",
                 "--max_train_steps", "1", "--validation_prompt", VALIDATION_PROMPT, "--num_validation_images", "1",
                 "--report_to", "tensorboard", *extra]
        log = run_in_process(SCRIPT, flags).stdout
        assert ("and the embeddings of 2 prompts" in log) == (extra == [])
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((tmp_path / name / "logs").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        image = np.asarray(Image.open(tmp_path / name / "validation" / "step_000001.png")).astype(np.int16)
        return {tag: events.Scalars(tag)[0].value for tag in ("train/loss_instance", "train/loss_prior")}, image

    cached, cached_image = one_step("cached", [])
    uncached, uncached_image = one_step("uncached", ["--no_cache"])
    assert cached == pytest.approx(uncached, rel=1e-5, abs=1e-7)
    assert np.abs(cached_image - uncached_image).max() <= 1


def test_vae_precision_and_text_encoder_targets(tiny_sdxl, assets):
    """Frozen weights in the mixed-precision dtype, except SDXL's own VAE (fp32: it overflows in fp16); a VAE
    given by --pretrained_vae_model_name_or_path replaces the base model's and runs in that dtype."""
    def loaded(base, sdxl, vae=None):
        args = SimpleNamespace(pretrained_model_name_or_path=base, revision=None, cache_dir=None, variant=None,
                               pretrained_vae_model_name_or_path=vae, sdxl=sdxl, rank=2, lora_alpha=2.0,
                               lora_dropout=0.0, train_text_encoder=True, use_dora=False)
        _, tokenizers, text_encoders, vae_model, unet = db.load_models(args, torch.bfloat16)
        assert len(tokenizers) == len(text_encoders) == (2 if sdxl else 1)
        assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
        return text_encoders, vae_model

    _, vae = loaded(tiny_sdxl, True)
    assert vae.dtype == torch.float32
    text_encoders, vae = loaded(tiny_sdxl, True, vae=f"{assets['tiny-sd']}/vae")
    assert vae.dtype == torch.bfloat16 and vae.config.scaling_factor == 0.18215  # tiny-sd's VAE, not tiny-sdxl's
    adapted = [{name.split("layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
               for model in text_encoders]
    layers = text_encoders[0].config.num_hidden_layers
    assert adapted[0] == {str(i) for i in range(layers - 1)} and adapted[1] == {str(i) for i in range(layers)}
    _, vae = loaded(assets["tiny-sd"], False, vae=f"{tiny_sdxl}/vae")
    assert vae.dtype == torch.bfloat16 and vae.config.scaling_factor == 0.13025


# ---- DoRA files load as trained ------------------------------------------------------------------------------


def adapter_tensors(model):
    """{parameter name without the adapter name: tensor} of a model's LoRA/DoRA parameters (the trained adapter is
    'default', the one load_lora_weights adds 'default_0')."""
    return {name.replace(".default.", ".").replace(".default_0.", "."): p.detach()
            for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_dora_adapters_load_as_trained_into_the_pipeline(kind, tiny_sdxl, assets, tmp_path, monkeypatch):
    """save_lora_files, then load_lora_weights as the model card says: every DoRA tensor of the UNet and of each
    text encoder (magnitude vectors included) is the trained one, and so are the text encoders' and the UNet's
    outputs. (transformers' adapter loader once dropped the text encoders' magnitudes without a word.) A resume
    reads the file back exactly too."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base = tiny_sdxl if kind == "sdxl" else assets["tiny-sd"]
    args = SimpleNamespace(pretrained_model_name_or_path=base, revision=None, cache_dir=None, variant=None,
                           pretrained_vae_model_name_or_path=None, sdxl=kind == "sdxl", rank=2, lora_alpha=2.0,
                           lora_dropout=0.0, train_text_encoder=True, use_dora=True)
    # plain from_pretrained: the memory-lean loader re-reads every tensor, seconds on a busy CI machine
    monkeypatch.setattr(db, "from_pretrained_in_dtype",
                        lambda model_class, dtype, location, **kwargs: model_class.from_pretrained(location, **kwargs))
    _, tokenizers, text_encoders, vae, unet = db.load_models(args, torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # stands in for training: every adapter tensor moves, magnitudes by up to 10%
        for model in (unet, *text_encoders):
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
                elif "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
    db.save_lora_files(unet, text_encoders, str(tmp_path), args.sdxl, kohya=False)

    pipeline = (StableDiffusionXLPipeline if args.sdxl else StableDiffusionPipeline).from_pretrained(base, vae=vae)
    pipeline.load_lora_weights(str(tmp_path))
    loaded_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if args.sdxl else [])
    for name, trained, loaded in zip(["unet", "text_encoder", "text_encoder_2"], [unet, *text_encoders],
                                     [pipeline.unet, *loaded_encoders]):
        expected, got = adapter_tensors(trained), adapter_tensors(loaded)
        assert sum("lora_magnitude_vector" in key for key in expected) >= 4, name
        assert got.keys() == expected.keys(), name
        differ = [key for key in expected if not torch.equal(got[key], expected[key])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[0]}"

    with torch.no_grad():
        for trained, loaded, tokenizer in zip(text_encoders, loaded_encoders, tokenizers):
            ids = tokenizer(["a photo of sks circle"], padding="max_length", max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            torch.testing.assert_close(loaded(ids)[0], trained(ids)[0], rtol=1e-4, atol=1e-5)
        table = db.encode_prompt_table(text_encoders, tokenizers, ["a photo of sks circle"], "cpu")
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        conditioning = db.unet_conditioning(table, torch.tensor([0]), time_ids)
        latents = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(pipeline.unet(latents, 10, **conditioning).sample,
                                   unet(latents, 10, **conditioning).sample, rtol=1e-4, atol=1e-5)

    # a resume reads the same file (as a checkpoint) back into the training models: every tensor as saved
    trained = [{key: t.clone() for key, t in adapter_tensors(model).items()} for model in (unet, *text_encoders)]
    with torch.no_grad():
        for model in (unet, *text_encoders):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.mul_(2)
    db.load_lora_checkpoint(unet, text_encoders, str(tmp_path))
    for expected, model in zip(trained, (unet, *text_encoders)):
        got = adapter_tensors(model)
        assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
