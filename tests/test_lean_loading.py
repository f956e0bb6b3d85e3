"""Frozen networks are loaded directly in the training dtype (issue 15): `from_pretrained_in_dtype` gives exactly
what `from_pretrained(torch_dtype=...)` gives, for safetensors and for other checkpoint formats, and every script's
`load_models` returns its frozen networks in the mixed-precision dtype and only its trained ones (and EMA
targets, and SDXL's own VAE, which overflows in fp16) in fp32, the students starting from the teacher's stored
weights, not from a rounded copy."""

import argparse

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from conftest import REPO, build_pipeline, make_toy_dataset

import train_bk_sdm_kd as bk  # noqa: E402
import train_dreambooth_lora as db  # noqa: E402
import train_lcm_distill_lora_sd_wds as lcm_lora  # noqa: E402
import train_lcm_distill_sd_wds as lcd  # noqa: E402
import train_lcm_distill_sdxl_wds as sdxl  # noqa: E402

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_pipeline("tiny-sdxl", str(tmp_path_factory.mktemp("xl") / "tiny-sdxl"), seed=0)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    make_toy_dataset(str(folder), num_images=2, seed=3, captions="txt")
    return folder


def states_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loader_equals_from_pretrained_with_torch_dtype(assets, dtype):
    for model_class, subfolder in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                                   (CLIPTextModel, "text_encoder")):
        lean = lcd.from_pretrained_in_dtype(model_class, dtype, assets["tiny-sd"], subfolder=subfolder)
        reference = model_class.from_pretrained(assets["tiny-sd"], subfolder=subfolder, torch_dtype=dtype)
        assert states_equal(lean, reference), subfolder
        assert {p.dtype for p in lean.parameters()} == {dtype}


def test_loader_other_formats_and_variants(assets, tmp_path):
    """A .bin checkpoint (no safetensors to read tensor by tensor) and an fp16 variant next to the fp32 files."""
    unet = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    lean = lcd.from_pretrained_in_dtype(UNet2DConditionModel, BF16, str(tmp_path / "bin"))
    assert states_equal(lean, unet.to(BF16))

    unet = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    unet.save_pretrained(tmp_path / "variant")
    # the fp16 variant holds other values than the main file: reading the wrong file would show
    noisy = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.5)
    noisy.to(torch.float16).save_pretrained(tmp_path / "variant", variant="fp16")
    for variant, expected in ((None, unet), ("fp16", noisy)):
        lean = lcd.from_pretrained_in_dtype(UNet2DConditionModel, BF16, str(tmp_path / "variant"), variant=variant)
        assert states_equal(lean, expected.to(BF16)), variant


def trained_and_frozen(*models):
    """(dtypes of the trained parameters, dtypes of the frozen ones) over `models`."""
    trained, frozen = set(), set()
    for model in models:
        for p in model.parameters():
            (trained if p.requires_grad else frozen).add(p.dtype)
    return trained, frozen


def parse(module, argv, tmp_path):
    args = module.parse_args([str(a) for a in argv] + ["--output_dir", str(tmp_path / module.__name__)])
    module.OutputDirLock.release_all()
    return args


def test_every_script_loads_frozen_networks_in_the_training_dtype(assets, tiny_sdxl, instance_dir, tmp_path):
    shards = ["--train_shards_path_or_url", assets["shards"], "--max_train_steps", "1"]
    teacher_fp32 = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")

    # full LCD: teacher, VAE, text encoder bf16; student and its EMA target fp32, exactly the stored teacher + a
    # zero omega projection
    args = parse(lcd, ["--pretrained_teacher_model", assets["tiny-sd"], *shards], tmp_path)
    _, _, text_encoder, vae, teacher, student, target = lcd.load_models(args, BF16)
    assert {p.dtype for m in (text_encoder, vae, teacher) for p in m.parameters()} == {BF16}
    assert {p.dtype for m in (student, target) for p in m.parameters()} == {torch.float32}
    expected = teacher_fp32.state_dict()
    for unet in (student, target):
        state = unet.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
        assert not state["time_embedding.cond_proj.weight"].any()
        assert not any(p.is_meta for p in unet.parameters())
    assert student.config.time_cond_proj_dim == args.unet_time_cond_proj_dim
    args = parse(lcd, ["--pretrained_teacher_model", assets["tiny-sd"], "--teacher_unet_fp32", *shards], tmp_path)
    assert {p.dtype for p in lcd.load_models(args, BF16)[4].parameters()} == {torch.float32}

    # LCM-LoRA: one UNet, frozen bf16 base with fp32 adapters
    args = parse(lcm_lora, ["--pretrained_teacher_model", assets["tiny-sd"], *shards], tmp_path)
    _, _, text_encoder, vae, unet = lcm_lora.load_models(args, BF16)
    assert {p.dtype for m in (text_encoder, vae) for p in m.parameters()} == {BF16}
    assert trained_and_frozen(unet) == ({torch.float32}, {BF16})

    # BK-SDM: frozen teacher bf16; the student fp32, its copied layers exactly the stored teacher's
    args = parse(bk, ["--pretrained_teacher_model", assets["tiny-sd"], *shards, "--unet_config_name", "bk_small"],
                 tmp_path)
    _, _, text_encoder, vae, teacher, student = bk.load_models(args, BF16)
    assert {p.dtype for m in (text_encoder, vae, teacher) for p in m.parameters()} == {BF16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert states_equal(student, bk.make_student_unet(teacher_fp32, "bk_small"))

    # SDXL, both modes: the own VAE stays fp32 (fp16 overflow), all else frozen in bf16
    base = ["--pretrained_teacher_model", tiny_sdxl, *shards, "--resolution", "64"]
    args = parse(sdxl, base + ["--use_lora"], tmp_path)
    _, _, text_encoders, vae, _, unet, _ = sdxl.load_models(args, BF16)
    assert {p.dtype for m in text_encoders for p in m.parameters()} == {BF16}
    assert trained_and_frozen(unet) == ({torch.float32}, {BF16})
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    args = parse(sdxl, base, tmp_path)
    _, _, text_encoders, vae, teacher, student, target = sdxl.load_models(args, BF16)
    assert {p.dtype for m in (*text_encoders, teacher) for p in m.parameters()} == {BF16}
    assert {p.dtype for m in (student, target) for p in m.parameters()} == {torch.float32}

    # DreamBooth, SD and SDXL (trained text encoders: their adapters fp32, their base bf16)
    for base_model in (assets["tiny-sd"], tiny_sdxl):
        args = parse(db, ["--pretrained_model_name_or_path", base_model, "--instance_data_dir", instance_dir,
                          "--instance_prompt", "a photo of sks circle", "--resolution", "64",
                          "--train_text_encoder"], tmp_path)
        _, _, text_encoders, vae, unet = db.load_models(args, BF16)
        assert trained_and_frozen(*text_encoders, unet) == ({torch.float32}, {BF16})
        assert {p.dtype for p in vae.parameters()} == {torch.float32 if args.sdxl else BF16}


def test_adamw_is_fused_only_on_cuda(assets, tmp_path):
    args = parse(lcd, ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url",
                       assets["shards"], "--max_train_steps", "1"], tmp_path)
    optimizer = lcd.make_optimizer(args, [torch.nn.Parameter(torch.ones(3))], 1e-4)
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]
    if torch.cuda.is_available():
        optimizer = lcd.make_optimizer(args, [torch.nn.Parameter(torch.ones(3, device="cuda"))], 1e-4)
        assert optimizer.defaults["fused"] is True


def test_freeing_a_vae_half_keeps_the_other_exact(assets):
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist.mean
        image = vae.decode(latent).sample
        lcd.free_unused_vae_halves(vae, encodes=True, decodes=False)
        assert torch.equal(vae.encode(pixels).latent_dist.mean, latent)
        assert vae.decoder is None
        vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
        lcd.free_unused_vae_halves(vae, encodes=False, decodes=True)
        assert torch.equal(vae.decode(latent).sample, image)
        assert vae.encoder is None
        lcd.free_unused_vae_halves(vae, encodes=False, decodes=False)  # what a run on precomputed latents keeps
        assert vae.device.type == "cpu" and vae.dtype == torch.float32


def test_attention_is_pytorch_sdpa_by_default(assets, tmp_path):
    args = parse(lcd, ["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url",
                       assets["shards"], "--max_train_steps", "1"], tmp_path)
    *_, teacher, student, target = lcd.load_models(args, BF16)
    for unet in (teacher, student, target):
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_channels_last_layout_gives_the_same_unet_output(assets, monkeypatch):
    unet = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet(sample, 10, text).sample
        args = argparse.Namespace(enable_xformers_memory_efficient_attention=False, channels_last=True)
        lcd.set_denoiser_kernels(args, unet, None)
        convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        # channels_last convolutions sum in another order (differences of ~1e-4 seen on AMD CPUs)
        torch.testing.assert_close(unet(sample, 10, text).sample, expected, rtol=1e-3, atol=5e-4)

    parsers = []  # every script's parser, caught as its parse_args builds it: one engine flag in all five

    def catch(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    for module in (lcd, lcm_lora, sdxl, bk, db):
        with pytest.raises(SystemExit):
            module.parse_args([])
    scripts = sorted(p.name for p in REPO.glob("train_*.py"))
    assert len(parsers) == len(scripts), (
        f"this test checks {len(parsers)} scripts' parsers but the repository has {len(scripts)} ({scripts}): add the "
        "new script's module to the tuple above")
    assert all(any("--channels_last" in a.option_strings for a in parser._actions) for parser in parsers)
