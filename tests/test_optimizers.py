"""--optimizer adamw | adamw8bit | prodigy | adafactor (issue 24): every script trains, checkpoints and resumes
exactly with each, --use_8bit_adam is an alias, and a missing package is one line at start-up.

How "every script x every optimiser" is covered without 5 x 4 end-to-end runs (CI is at its time budget): the
whole optimiser path is ENGINE code, the same in every script (the copy checker enforces it): check_optimizer_args
reads the flags, make_optimizer builds the optimiser, train() hands it to accelerate, whose save_state/load_state
write and read its state_dict. What a script adds is only the list of tensors it trains (`optimizer_params`: a
full UNet or LoRA matrices, fp32). So:
- per script and optimiser (20 cases, a fraction of a second each): the script's own parse_args resolves the flags,
  its own make_optimizer builds the right optimiser, which trains 2 steps on tensors shaped like the scripts' (conv
  kernels, >= 4096-element matrices for 8-bit state, vectors), and a state_dict saved and loaded as accelerate does
  continues bit-identically;
- one script per optimiser runs the whole path in process (train 2 steps with checkpoints, resume checkpoint-1
  for the last step, same weights and optimiser state at the end): adamw in each script's own resume test
  (test_lcm_sd_e2e, test_lcm_lora_sd, test_lcm_sdxl, test_bk_sdm, test_dreambooth_lora), adamw8bit in
  test_8bit_adam (full LCD and DreamBooth LoRA), prodigy with DreamBooth LoRA (its usual use) and adafactor with
  BK-SDM (a full UNet, where its factored state saves memory) here: 2 steps, then 1 resumed, in process."""

import io
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train_bk_sdm_kd as bk
import train_dreambooth_lora as db
import train_lcm_distill_lora_sd_wds as lcm_lora
import train_lcm_distill_sd_wds as lcd
import train_lcm_distill_sdxl_wds as lcm_xl
from conftest import REPO, assert_resumed_exactly, checkpoint_optimizer_state, rejection_line, train_then_resume
from make_toy_dataset import make_toy_dataset

ALL_SCRIPTS = (lcd, lcm_lora, lcm_xl, bk, db)


def test_every_script_is_covered():
    scripts = sorted(p.name for p in REPO.glob("train_*.py"))
    assert sorted(f"{m.__name__}.py" for m in ALL_SCRIPTS) == scripts, (
        f"tests/test_optimizers.py checks {sorted(m.__name__ for m in ALL_SCRIPTS)} but the repository has {scripts}: "
        "add the new script's module to ALL_SCRIPTS there, and its required flags to flags_for")


def flags_for(module, assets, output_dir):
    # SDXL: a Hub id, whose kind parse_args leaves to loading, so no SDXL folder has to be built for the flags
    teacher = "org/some-sdxl-teacher" if module is lcm_xl else assets["tiny-sd"]
    if module is db:
        return ["--pretrained_model_name_or_path", teacher, "--instance_data_dir", assets["images"],
                "--instance_prompt", "a photo of sks", "--output_dir", str(output_dir)]
    data = ["--train_data_dir", assets["images"]] if module is bk else ["--train_shards_path_or_url", assets["shards"]]
    return ["--pretrained_teacher_model", teacher, *data, "--output_dir", str(output_dir), "--resolution", "64",
            "--max_train_steps", "1", "--validation_prompts", "x"]


def parse(module, argv):
    try:
        return module.parse_args([str(a) for a in argv])
    finally:
        module.OutputDirLock.release_all()  # parsing locks the output dir


def trained_tensors(seed):
    """Shaped like what the scripts train: a conv kernel, a matrix of 4096 elements (bitsandbytes gives 8-bit
    state from that size on; Adafactor factors every >= 2-D tensor) and a bias vector."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((8, 4, 3, 3), (64, 64), (8,))]


def take_step(optimizer, params, targets):
    optimizer.zero_grad(set_to_none=True)
    sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit", "prodigy", "adafactor"])
@pytest.mark.parametrize("module", ALL_SCRIPTS, ids=lambda m: m.__name__)
def test_every_script_builds_each_optimizer_and_its_state_round_trip_continues_exactly(
        module, optimizer_name, assets, tmp_path):
    expected_type = {"adamw": torch.optim.AdamW, "prodigy": pytest.importorskip("prodigyopt").Prodigy,
                     "adafactor": pytest.importorskip("transformers.optimization").Adafactor}
    if optimizer_name == "adamw8bit":
        expected_type["adamw8bit"] = pytest.importorskip("bitsandbytes").optim.AdamW8bit
    args = parse(module, flags_for(module, assets, tmp_path / "out") + ["--optimizer", optimizer_name])
    assert args.optimizer == optimizer_name and args.use_8bit_adam == (optimizer_name == "adamw8bit")
    # Prodigy's --learning_rate multiplies the step size it estimates: 1.0 unless given
    default_lr = parse(module, flags_for(module, assets, tmp_path / "out")).learning_rate
    assert args.learning_rate == (1.0 if optimizer_name == "prodigy" else default_lr)

    params = trained_tensors(seed=0)
    targets = [torch.zeros_like(p) for p in params]
    optimizer = module.make_optimizer(args, params, 1e-2)
    assert type(optimizer) is expected_type[optimizer_name]
    start = [p.detach().clone() for p in params]
    for _ in range(2):
        take_step(optimizer, params, targets)
    assert all(not torch.equal(p, s) for p, s in zip(params, start)), "a step left a tensor unchanged"
    # as accelerate's save_state and load_state do: torch.save of state_dict(), torch.load, load_state_dict
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = module.make_optimizer(args, resumed_params, 1e-2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    take_step(optimizer, params, targets)
    take_step(resumed, resumed_params, targets)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q), f"{optimizer_name}: the resumed step differs"


def test_optimizer_flags_reach_the_optimizer():
    """Each optimiser's own flags end up in its parameter groups (none is a dead flag)."""
    pytest.importorskip("prodigyopt")
    common = dict(adam_beta1=0.8, adam_beta2=0.99, adam_weight_decay=0.01, adam_epsilon=1e-6)
    prodigy = lcd.make_optimizer(SimpleNamespace(
        optimizer="prodigy", prodigy_beta3=0.5, prodigy_d_coef=0.5, prodigy_decouple=False,
        prodigy_use_bias_correction=False, prodigy_safeguard_warmup=False, **common), trained_tensors(0), 1.0)
    group = prodigy.param_groups[0]
    assert (group["lr"], group["betas"], group["beta3"], group["d_coef"], group["eps"], group["weight_decay"]) == (
        1.0, (0.8, 0.99), 0.5, 0.5, 1e-6, 0.01)
    assert not group["decouple"] and not group["use_bias_correction"] and not group["safeguard_warmup"]
    defaults = lcd.make_optimizer(SimpleNamespace(
        optimizer="prodigy", prodigy_beta3=None, prodigy_d_coef=None, prodigy_decouple=None,
        prodigy_use_bias_correction=None, prodigy_safeguard_warmup=None, **common), trained_tensors(0), 1.0)
    group = defaults.param_groups[0]
    assert group["beta3"] is None and group["d_coef"] == 1.0  # beta3 None: Prodigy takes sqrt(beta2)
    assert group["decouple"] and group["use_bias_correction"] and group["safeguard_warmup"]
    adafactor = lcd.make_optimizer(SimpleNamespace(
        optimizer="adafactor", adafactor_beta1=0.9, adafactor_decay_rate=-0.5, adafactor_clip_threshold=2.0,
        adafactor_scale_parameter=True, **common), trained_tensors(0), 3e-4)
    group = adafactor.param_groups[0]
    assert (group["lr"], group["beta1"], group["decay_rate"], group["clip_threshold"], group["weight_decay"]) == (
        3e-4, 0.9, -0.5, 2.0, 0.01)
    assert group["scale_parameter"] and not group["relative_step"] and not group["warmup_init"]


def test_optimizer_flag_errors_are_one_line(assets, tmp_path, capsys, monkeypatch):
    accepted = flags_for(lcd, assets, tmp_path / "accepted")
    args = parse(lcd, accepted + ["--use_8bit_adam"])
    assert args.optimizer == "adamw8bit" and args.use_8bit_adam
    assert parse(lcd, accepted + ["--optimizer", "prodigy", "--learning_rate", "0.5"]).learning_rate == 0.5
    flags = flags_for(lcd, assets, tmp_path / "out")
    assert rejection_line(lcd, flags + ["--use_8bit_adam", "--optimizer", "prodigy"], capsys).endswith(
        "error: --use_8bit_adam is an alias of --optimizer adamw8bit; it contradicts --optimizer prodigy")
    assert rejection_line(lcd, flags + ["--prodigy_d_coef", "0.5"], capsys).endswith(
        "error: --prodigy_d_coef applies to --optimizer prodigy only (this run uses adamw)")
    assert rejection_line(lcd, flags + ["--optimizer", "prodigy", "--adafactor_beta1", "0.9"], capsys).endswith(
        "error: --adafactor_beta1 applies to --optimizer adafactor only (this run uses prodigy)")
    real_find_spec = lcd.importlib.util.find_spec
    monkeypatch.setattr(lcd.importlib.util, "find_spec", lambda name, *a: None if name in (
        "prodigyopt", "bitsandbytes") else real_find_spec(name, *a))
    assert rejection_line(lcd, flags + ["--optimizer", "prodigy"], capsys).endswith(
        "error: --optimizer prodigy needs prodigyopt: pip install prodigyopt")
    assert rejection_line(lcd, flags + ["--use_8bit_adam"], capsys).endswith(
        "error: --use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    assert not (tmp_path / "out").exists()  # refused before the output dir is made


def test_resume_with_another_optimizer_is_refused():
    record = {"script": "s.py", "method": "m", "topology": {}, "optimizer": "prodigy"}
    with pytest.raises(SystemExit, match=r"^error: cannot resume ckpt: it was trained with --optimizer adamw, this run "
                                         r"has --optimizer prodigy \(the optimiser state does not carry over\)"):
        lcd.check_resume_compatible({"script": "s.py", "method": "m", "optimizer": "adamw"}, record, "ckpt")
    lcd.check_resume_compatible({"script": "s.py", "method": "m", "optimizer": "prodigy"}, record, "ckpt")
    lcd.check_resume_compatible({"script": "s.py", "method": "m"}, record, "ckpt")  # from before it was recorded


@pytest.mark.slow
def test_dreambooth_lora_trains_and_resumes_exactly_with_prodigy(assets, tmp_path, monkeypatch):
    """Prodigy keeps part of its state in the parameter groups, not per parameter: its step count k (Adam's bias
    correction), the step-size estimate d and the running numerator that d grows from. The checkpoint must carry
    them, or the resumed step is another one. DreamBooth LoRA: where diffusers introduced Prodigy (PR #5508)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    instance_dir = tmp_path / "instance"
    make_toy_dataset(str(instance_dir), num_images=4, seed=3, captions="txt")
    output_dir = tmp_path / "run"
    flags = [
        "--pretrained_model_name_or_path", assets["tiny-sd"], "--instance_data_dir", instance_dir,
        "--instance_prompt", "a photo of sks circle", "--output_dir", output_dir, "--resolution", "64",
        "--train_batch_size", "2", "--seed", "0", "--rank", "4", "--save_precision", "fp32", "--report_to", "none",
        "--optimizer", "prodigy", "--max_train_steps", "2", "--checkpointing_steps", "1",
    ]
    uninterrupted, resumed, resumed_dir, expected, got = train_then_resume(
        "train_dreambooth_lora.py", db, flags, output_dir, tmp_path, monkeypatch, 1,
        lambda run_dir: load_file(str(run_dir / db.LORA_WEIGHT_NAME)))
    [optimizer] = uninterrupted["optimizers"]
    assert type(optimizer) is prodigyopt.Prodigy and optimizer.param_groups[0]["lr"] == 1.0  # its default rate
    _, [group] = checkpoint_optimizer_state(output_dir / "checkpoint-1")
    assert group["k"] == 1 and group["d_denom"] > 0  # a fresh Prodigy has k 0, d_denom 0
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in expected.items())  # B starts at zero
    assert_resumed_exactly(output_dir, resumed_dir, resumed, 1, 2, expected, got)
    _, [final] = checkpoint_optimizer_state(output_dir / "checkpoint-2")
    assert final["k"] == 2 and final["d_numerator"] != 0  # and these came out equal in the resumed run


@pytest.mark.slow
def test_bk_sdm_trains_and_resumes_exactly_with_adafactor(assets, tmp_path, monkeypatch):
    from transformers.optimization import Adafactor

    output_dir = tmp_path / "run"
    flags = [
        "--pretrained_teacher_model", assets["tiny-sd"], "--train_data_dir", assets["images"],
        "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
        "--unet_config_name", "bk_tiny", "--validation_prompts", "--report_to", "none", "--optimizer", "adafactor",
        "--learning_rate", "1e-3", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--dataloader_num_workers", "0",
    ]
    uninterrupted, resumed, resumed_dir, expected, got = train_then_resume(
        "train_bk_sdm_kd.py", bk, flags, output_dir, tmp_path, monkeypatch, 1,
        lambda run_dir: load_file(str(run_dir / "unet" / "diffusion_pytorch_model.safetensors")))
    [optimizer] = uninterrupted["optimizers"]
    assert type(optimizer) is Adafactor
    saved, _ = checkpoint_optimizer_state(output_dir / "checkpoint-1")
    factored = [s for s in saved if "exp_avg_sq_row" in s]
    assert factored and all("exp_avg" not in s for s in saved)  # factored second moments, no first moment
    assert_resumed_exactly(output_dir, resumed_dir, resumed, 1, 2, expected, got)
