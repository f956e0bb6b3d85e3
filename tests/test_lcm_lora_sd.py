"""train_lcm_distill_lora_sd_wds.py end to end, as a user runs it (`accelerate launch` on a tiny random
pipeline and local shards), then the LoRA files loaded into the real diffusers pipeline; resume in process
(see conftest); and the LoRA set-up (one UNet, frozen base, fp32 adapters, disabled adapters = teacher)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_lcm_distill_lora_sd_wds as lcm_lora
from conftest import rejection_line, run_in_process, run_script
from make_random_pipeline import build_pipeline

SCRIPT = "train_lcm_distill_lora_sd_wds.py"
PROMPT = "a red circle"


def lora_flags(teacher, shards, output_dir):
    return [
        "--pretrained_teacher_model", teacher,
        "--train_shards_path_or_url", shards,
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--shuffle_buffer_size", "4",
        "--lora_rank", "4",
        "--lora_alpha", "8",  # alpha != rank: the files must carry the scale 2
        "--save_precision", "fp32",
        "--validation_prompts", PROMPT,
    ]


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """4 optimiser steps of 2 accumulated batches, 2 loader workers, a corrupt shard, checkpoints every step
    (limit 2), validation at the end."""
    output_dir = tmp_path_factory.mktemp("lcm_lora") / "run"
    shards = f"{assets['shards']}::{assets['corrupt_shard']}"
    flags = lora_flags(assets["tiny-sd"], shards, output_dir) + [
        "--max_train_steps", "4",
        "--gradient_accumulation_steps", "2",
        "--dataloader_num_workers", "2",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--validation_steps", "0",
        "--report_to", "tensorboard",
    ]
    result = run_script(SCRIPT, flags)
    return {"output_dir": output_dir, "flags": flags, "log": result.stdout}


def lcm_pipeline(teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=4):
    """What the script's validation does for one grid cell: same prompt, seed, size and guidance 1.0."""
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=64, width=64,
                generator=generator, output_type="np").images[0]


def test_outputs_rotation_card_and_logs(lora_run, assets):
    out = lora_run["output_dir"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    checkpoint = out / "checkpoint-4"
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["n_corrupt"] >= 1
    # checkpoints hold the adapter only, never a second copy of the UNet
    assert (checkpoint / lcm_lora.LORA_WEIGHT_NAME).is_file()
    assert not list(checkpoint.rglob("diffusion_pytorch_model*")) and not (checkpoint / "model.safetensors").exists()
    files = {p.name for p in out.iterdir()}
    assert {lcm_lora.LORA_WEIGHT_NAME, lcm_lora.KOHYA_WEIGHT_NAME, "README.md", "validation", "logs"} <= files
    assert "unet" not in files
    grid = Image.open(out / "validation" / "lora_step_000004.png")
    assert grid.size == (4 * 64, 64)
    card = (out / "README.md").read_text()
    assert "base_model: " + str(assets["tiny-sd"]) in card and "- lcm-lora" in card
    assert "load_lora_weights" in card and "guidance_scale=1.0" in card and "| 4 / 8.0 / 0.0 |" in card
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    assert "LoRA parameters" in lora_run["log"] and "loss=" in lora_run["log"]


def test_files_keep_alpha_and_kohya_keys(lora_run):
    out = lora_run["output_dir"]
    with safe_open(str(out / lcm_lora.LORA_WEIGHT_NAME), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    diffusers_file = load_file(out / lcm_lora.LORA_WEIGHT_NAME)
    kohya = load_file(out / lcm_lora.KOHYA_WEIGHT_NAME)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(kohya[f"{name}.lora_down.weight"],
                       diffusers_file["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert kohya[f"{name}.alpha"].item() == 8.0
    assert len(kohya) == len(diffusers_file) * 3 // 2  # down, up, alpha per module
    kinds = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert {"to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "2", "conv1", "conv2", "conv_shortcut",
            "time_emb_proj", "conv"} <= kinds
    # the adapter learned something: lora_B starts at zero
    assert any(t.abs().max() > 0 for k, t in diffusers_file.items() if ".lora_B." in k)


def test_loaded_lora_reproduces_training_student_and_kohya_file_matches(lora_run, assets):
    """The validation grid was drawn by the in-training student (alpha 8, rank 4); the pipeline with the saved
    file must draw the same picture, and the kohya file must give the same image as the diffusers file."""
    out = lora_run["output_dir"]
    pipe = lcm_pipeline(assets["tiny-sd"])
    base_image = generate(pipe)
    pipe.load_lora_weights(str(out))
    image = generate(pipe)
    grid = np.asarray(Image.open(out / "validation" / "lora_step_000004.png")).astype(np.int16)
    trained_cell = grid[:, 2 * 64:3 * 64]  # columns: 1, 2, 4, 8 steps
    assert np.abs(np.round(image * 255).astype(np.int16) - trained_cell).max() <= 1
    assert np.abs(image - base_image).max() > 1e-3, "the LoRA changed nothing"

    kohya_pipe = lcm_pipeline(assets["tiny-sd"])
    kohya_pipe.load_lora_weights(str(out), weight_name=lcm_lora.KOHYA_WEIGHT_NAME)
    # the kohya path folds alpha/r into the weights: the same image up to float rounding (seen: 1.3e-5)
    np.testing.assert_allclose(generate(kohya_pipe), image, atol=1e-4)


def test_adapter_loads_onto_another_fine_tune(lora_run, tmp_path):
    """Same architecture, different weights (a stand-in for another fine-tune of the base): loads and samples."""
    other = build_pipeline("tiny-sd", str(tmp_path / "other"), seed=1)
    pipe = lcm_pipeline(other)
    before = generate(pipe)
    pipe.load_lora_weights(str(lora_run["output_dir"]))
    after = generate(pipe)
    assert after.shape == (64, 64, 3) and np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-3


def test_resume_from_latest_equals_uninterrupted_run(lora_run, tmp_path):
    resumed = tmp_path / "resumed"
    original = lora_run["output_dir"]
    keep = lambda d, names: [n for n in names if Path(d) == original and not n.startswith("checkpoint-3")]  # noqa: E731
    shutil.copytree(original, resumed, ignore=keep)
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint-3"]
    flags = [str(resumed) if str(f) == str(original) else str(f) for f in lora_run["flags"]]
    result = run_in_process(SCRIPT, flags + ["--resume_from_checkpoint", "latest"])
    assert "resuming from" in result.stdout and "checkpoint-3" in result.stdout
    expected = load_file(original / lcm_lora.LORA_WEIGHT_NAME)
    got = load_file(resumed / lcm_lora.LORA_WEIGHT_NAME)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


# ---- the LoRA set-up, in process --------------------------------------------------------------------------


@pytest.fixture
def script_args(assets, tmp_path):
    return lcm_lora.parse_args(lora_flags(assets["tiny-sd"], assets["shards"], tmp_path / "o")
                               + ["--max_train_steps", "2"])


def set_lora_b(unet, value):
    """Make the adapters matter (lora_B starts at zero, so a fresh adapter is the identity)."""
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.fill_(value)


def unet_inputs(unet, batch=2):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), context


def test_one_unet_only_lora_trainable_and_disabled_adapters_are_the_teacher(script_args, assets):
    from diffusers import UNet2DConditionModel

    _, _, _, _, unet = lcm_lora.load_models(script_args, torch.float32)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    optimizer = lcm_lora.make_optimizer(script_args, [p for p in unet.parameters() if p.requires_grad], 1e-4)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in unet.parameters() if p.requires_grad}

    base = UNet2DConditionModel.from_pretrained(Path(assets["tiny-sd"]) / "unet")
    set_lora_b(unet, 0.01)
    sample, timesteps, context = unet_inputs(unet)
    with torch.no_grad():
        expected = base(sample, timesteps, encoder_hidden_states=context).sample
        with lcm_lora.adapters_disabled(unet) as teacher:
            # equal up to float rounding: the two networks hold the same weights in differently placed memory, and
            # on some CPUs the kernels then round differently (~1e-7); the adapters below change it by > 1e-4
            torch.testing.assert_close(teacher(sample, timesteps, encoder_hidden_states=context).sample, expected,
                                       rtol=0, atol=1e-5)
        student = unet(sample, timesteps, encoder_hidden_states=context).sample
    assert (student - expected).abs().max() > 1e-4, "adapters enabled again after the teacher pass"


def test_training_steps_move_only_lora_and_gradient_checkpointing_keeps_grads(script_args):
    _, _, _, _, unet = lcm_lora.load_models(script_args, torch.float32)
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    scheduler = lcm_lora.DDPMScheduler.from_pretrained(script_args.pretrained_teacher_model, subfolder="scheduler")
    ctx = lcm_lora.make_lcd_context(script_args, scheduler, unet, teacher_unet=unet, target_unet=unet,
                                    w_embedding_dim=0, device=torch.device("cpu"),
                                    autocast=lambda: torch.autocast("cpu", enabled=False),
                                    teacher_is_student_without_adapters=True)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = lcm_lora.make_optimizer(script_args, lora_params, 1e-3)
    unet.enable_gradient_checkpointing()
    unet.train()
    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    uncond = torch.zeros_like(context)
    for _ in range(2):
        loss = lcm_lora.lcd_loss(ctx, latents, {"encoder_hidden_states": context}, {"encoder_hidden_states": uncond})
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in lora_params if p.grad is not None]
        assert grads and any(g.abs().max() > 0 for g in grads), "no LoRA gradient under gradient checkpointing"
        optimizer.step()
        optimizer.zero_grad()
    for name, param in unet.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_before[name]), f"frozen {name} changed"
    assert any(p.abs().max() > 0 for n, p in unet.named_parameters() if "lora_B" in n)


def test_bf16_base_keeps_lora_fp32_also_after_checkpoint_load(script_args, tmp_path):
    _, _, _, _, unet = lcm_lora.load_models(script_args, torch.bfloat16)
    lora_dtypes = {p.dtype for p in unet.parameters() if p.requires_grad}
    base_dtypes = {p.dtype for n, p in unet.named_parameters() if not p.requires_grad}
    assert lora_dtypes == {torch.float32} and base_dtypes == {torch.bfloat16}
    set_lora_b(unet, 0.5)
    lcm_lora.save_lora_files(unet, str(tmp_path), kohya=False)
    set_lora_b(unet, 0.0)
    lcm_lora.load_lora_checkpoint(unet, str(tmp_path))
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    assert all(torch.all(p == 0.5) for n, p in unet.named_parameters() if "lora_B" in n)
    # final files in the requested precision, alpha in the metadata
    lcm_lora.save_lora_files(unet, str(tmp_path / "fp16"), dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "fp16" / lcm_lora.LORA_WEIGHT_NAME).values()} == {torch.float16}


def test_kohya_key_conversion():
    peft = {"mid_block.resnets.0.conv1.lora_A.weight": torch.ones(2, 3, 3, 3),
            "mid_block.resnets.0.conv1.lora_B.weight": torch.zeros(5, 2, 1, 1),
            "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight": torch.ones(2, 8)}
    kohya = lcm_lora.peft_to_kohya_state_dict(peft, alpha=1.5)
    assert set(kohya) == {
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight", "lora_unet_mid_block_resnets_0_conv1.lora_up.weight",
        "lora_unet_mid_block_resnets_0_conv1.alpha",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
    }
    assert kohya["lora_unet_mid_block_resnets_0_conv1.alpha"].item() == 1.5


def parse_error(capsys, argv):
    return rejection_line(lcm_lora, argv, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora_target_modules", "to_q,attn_qkv"], "unknown module kind 'attn_qkv'; valid kinds: to_q, to_k"),
        (["--lora_target_modules", ","], "--lora_target_modules: names no module kind"),
        (["--lora_rank", "0"], "--lora_rank: must be >= 1, got 0"),
        (["--lora_alpha", "-1"], "--lora_alpha: must be > 0"),
        (["--lora_dropout", "1"], "--lora_dropout: must be < 1"),
        (["--w_min", "9", "--w_max", "3"], "--w_min (9.0) must not exceed --w_max (3.0)"),
        (["--ema_decay", "1"], "--ema_decay: must be < 1"),
        (["--num_phases", "3"], "--num_phases 3 must divide --num_ddim_timesteps 50"),
        (["--num_phases", "5", "--timestep_scaling_factor", "10"], "--timestep_scaling_factor applies only to LCD"),
        (["--resolution", "60"], "--resolution must be a positive multiple of 8"),
    ],
)
def test_bad_flags_are_one_line(capsys, assets, tmp_path, extra, message):
    flags = lora_flags(assets["tiny-sd"], assets["shards"], tmp_path / "o") + ["--max_train_steps", "1"]
    assert message in parse_error(capsys, flags + extra)


def test_defaults_and_target_kinds(script_args, assets, tmp_path):
    args = lcm_lora.parse_args(["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url",
                                assets["shards"], "--max_train_steps", "1", "--output_dir", str(tmp_path)])
    assert args.lora_rank == 64 and args.lora_alpha == 64.0 and args.learning_rate == 1e-4
    assert args.validation_guidance_scale == 1.0 and args.save_precision == "fp16"
    assert args.lora_target_modules == list(lcm_lora.LORA_TARGET_KINDS)
    # --ema_decay: 0.95 where the EMA copy can live, the online target under FSDP/DeepSpeed or with 'none'
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    PartialState()  # the script logs through accelerate's logger, which needs a state
    for given, distributed_type, resolved in [
            (None, DistributedType.NO, 0.95), (None, DistributedType.MULTI_GPU, 0.95),
            (None, DistributedType.DEEPSPEED, None), (None, DistributedType.FSDP, None),
            ("none", DistributedType.NO, None), (0.5, DistributedType.NO, 0.5),
            (0.5, DistributedType.DEEPSPEED, 0.5)]:  # an explicit decay is refused there when the method starts
        args.ema_decay = given
        lcm_lora.resolve_ema_decay(args, SimpleNamespace(distributed_type=distributed_type))
        assert args.ema_decay == resolved, (given, distributed_type)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert lcm_lora.parse_args(["--pretrained_teacher_model", assets["tiny-sd"], "--train_shards_path_or_url",
                                assets["shards"], "--max_train_steps", "1", "--output_dir", str(tmp_path),
                                "--ema_decay", "None"]
                               ).ema_decay == "none"
    with pytest.raises(lcm_lora.LoraTargetError, match="'conv_shortcut' matches no layer"):
        lcm_lora.check_lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["conv_shortcut"])


# ---- --ema_decay: an EMA of the adapter as the consistency target -----------------------------------------


def test_ema_adapter_is_the_target_and_the_online_adapter_comes_back(script_args):
    _, _, _, _, unet = lcm_lora.load_models(script_args, torch.float32)
    set_lora_b(unet, 0.01)
    ema = lcm_lora.EmaAdapter(unet)
    set_lora_b(unet, 0.05)  # the online adapter moves on
    ema.update(0.5)  # theta- <- 0.5 theta- + 0.5 theta: lora_B = 0.03
    sample, timesteps, context = unet_inputs(unet)
    with torch.no_grad():
        online = unet(sample, timesteps, encoder_hidden_states=context).sample
        set_lora_b(unet, 0.03)
        expected = unet(sample, timesteps, encoder_hidden_states=context).sample
        set_lora_b(unet, 0.05)
    scheduler = lcm_lora.DDPMScheduler.from_pretrained(script_args.pretrained_teacher_model, subfolder="scheduler")
    ctx = lcm_lora.make_lcd_context(script_args, scheduler, unet, teacher_unet=unet, target_unet=unet,
                                    w_embedding_dim=0, device=torch.device("cpu"),
                                    autocast=lambda: torch.autocast("cpu", enabled=False),
                                    teacher_is_student_without_adapters=True, target_weights=ema.in_place)
    target = lcm_lora.target_prediction(ctx, sample, timesteps, {}, {"encoder_hidden_states": context})
    torch.testing.assert_close(target, expected, rtol=1e-3, atol=1e-5)  # lerp to 0.03 rounds unlike fill(0.03)
    assert (target - online).abs().max() > 1e-4
    assert all(torch.all(p == 0.05) for n, p in unet.named_parameters() if "lora_B" in n), "online adapter not back"
    # the checkpoint form round-trips; a different LoRA config is refused in one line
    state = ema.state_dict()
    ema.update(0.0)
    ema.load_state_dict(state)
    assert all(torch.equal(w, state[name]) for (name, _), w in zip(ema.named, ema.weights))
    with pytest.raises(SystemExit, match="error: the checkpoint's EMA adapter does not match"):
        ema.load_state_dict({k: v for k, v in list(state.items())[1:]})


def test_ema_target_run_saves_checkpoints_and_output_and_resumes_exactly(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    output_dir = tmp_path / "ema"
    flags = lora_flags(assets["tiny-sd"], assets["shards"], output_dir) + [
        "--max_train_steps", "3", "--checkpointing_steps", "1", "--validation_steps", "0", "--ema_decay", "0.5",
        "--validation_prompts"]
    run_in_process(SCRIPT, flags)
    assert (output_dir / "checkpoint-2" / lcm_lora.EMA_ADAPTER_NAME).is_file()
    assert "EMA of the adapter, decay 0.5" in (output_dir / "README.md").read_text()
    online, ema = load_file(output_dir / lcm_lora.LORA_WEIGHT_NAME), load_file(output_dir / "ema_target" /
                                                                                  lcm_lora.LORA_WEIGHT_NAME)
    assert online.keys() == ema.keys() and any(not torch.equal(online[k], ema[k]) for k in online)
    pipe = StableDiffusionPipeline.from_pretrained(assets["tiny-sd"], safety_checker=None)
    pipe.load_lora_weights(output_dir / "ema_target")  # a loadable adapter folder
    # resume from step 2 gives the same online and EMA adapters as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    result = run_in_process(SCRIPT, [str(resumed) if f == str(output_dir) else f for f in flags]
                            + ["--resume_from_checkpoint", "latest"])
    assert "checkpoint-2" in result.stdout
    for name in (lcm_lora.LORA_WEIGHT_NAME, f"ema_target/{lcm_lora.LORA_WEIGHT_NAME}"):
        expected, got = load_file(output_dir / name), load_file(resumed / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"{name} differs after resume"
    # a resume that would drop (or add) the EMA adapter is refused in one line, before any model loads
    other = tmp_path / "without_ema"
    shutil.copytree(output_dir / "checkpoint-2", other / "checkpoint-2")
    result = run_in_process(SCRIPT, [str(other) if f == str(output_dir) else f for f in flags]
                            + ["--resume_from_checkpoint", "latest", "--ema_decay", "none"], check=False)
    assert result.returncode == 1
    assert "error: cannot resume" in result.stdout and "--ema_decay a decay -> none" in result.stdout
