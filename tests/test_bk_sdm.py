"""train_bk_sdm_kd.py: the student derivation against the paper's parameter counts, the weight copy and the
loss against independent formulas, and end-to-end runs as a user makes them. The main run goes through
`accelerate launch` with 2 processes (real DDP over gloo); its variants run in process (see conftest)."""

import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import train_bk_sdm_kd as bk
from conftest import REPO, rejection_line, run_in_process, run_script

sys.path.insert(0, str(REPO / "tools"))
from make_random_pipeline import PRESETS  # noqa: E402
from make_toy_dataset import make_toy_dataset  # noqa: E402

SCRIPT = "train_bk_sdm_kd.py"
STUDENTS = ("bk_base", "bk_small", "bk_tiny")


# ----------------------------------------------------------------------------------------------------------
# Student architecture
# ----------------------------------------------------------------------------------------------------------


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def test_student_parameter_counts_match_the_paper():
    """The real SD 1.x UNet config, built without weights: teacher and students have the BK-SDM counts."""
    teacher = meta_unet(PRESETS["sd15"]["unet"])
    counts = {name: bk.count_parameters(meta_unet(bk.student_unet_config(teacher.config, name))) for name in STUDENTS}
    assert bk.count_parameters(teacher) == 859_520_964
    assert counts == {"bk_base": 579_384_964, "bk_small": 482_346_884, "bk_tiny": 323_384_964}


def test_sd2_students_derive_and_build():
    """SD 2.x: 1024-d cross-attention, linear projections and per-level head counts are carried over."""
    teacher = meta_unet(PRESETS["sd21"]["unet"])
    counts = []
    for name in STUDENTS:
        config = bk.student_unet_config(teacher.config, name)
        student = meta_unet(config)
        assert student.config.cross_attention_dim == 1024 and student.config.use_linear_projection
        counts.append(bk.count_parameters(student))
    assert bk.count_parameters(teacher) > counts[0] > counts[1] > counts[2]
    tiny = bk.student_unet_config(teacher.config, "bk_tiny")
    assert list(tiny["attention_head_dim"]) == [5, 10, 20]
    assert list(tiny["block_out_channels"]) == [320, 640, 1280]


def test_block_structure_of_each_student(assets):
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    base, small, tiny = (bk.make_student_unet(teacher, name) for name in STUDENTS)
    for student in (base, small, tiny):
        assert all(len(block.resnets) == 1 for block in student.down_blocks)
        assert all(len(block.resnets) == 2 for block in student.up_blocks)
    assert base.mid_block is not None and small.mid_block is None and tiny.mid_block is None
    assert len(small.down_blocks) == 4 and len(tiny.down_blocks) == 3 and len(tiny.up_blocks) == 3
    assert tiny.down_blocks[2].downsamplers is None and teacher.down_blocks[2].downsamplers is not None
    assert [type(b).__name__ for b in tiny.up_blocks] == ["CrossAttnUpBlock2D"] * 3
    sample = torch.randn(1, 4, 8, 8)
    embeds = torch.randn(1, 77, 32)
    with torch.no_grad():
        for student in (base, small, tiny):
            assert student(sample, 10, encoder_hidden_states=embeds).sample.shape == sample.shape


def test_non_sd_teacher_is_refused_in_one_line():
    config = dict(PRESETS["sdxl"]["unet"])
    with pytest.raises(ValueError) as excinfo:
        bk.student_unet_config(config, "bk_small")
    assert "SD 1.x/2.x UNet" in str(excinfo.value) and "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="unknown --unet_config_name 'bk_huge'"):
        bk.student_unet_config(PRESETS["sd15"]["unet"], "bk_huge")


# ----------------------------------------------------------------------------------------------------------
# Weight copy
# ----------------------------------------------------------------------------------------------------------

# the mapping written out by hand from the BK-SDM block-removal tables (Kim et al., 2023), for one tensor of each kind
EXPECTED_SOURCES = {
    "bk_small": {
        "conv_in.weight": "conv_in.weight",
        "down_blocks.1.resnets.0.conv1.weight": "down_blocks.1.resnets.0.conv1.weight",
        "down_blocks.2.downsamplers.0.conv.weight": "down_blocks.2.downsamplers.0.conv.weight",
        "up_blocks.0.resnets.1.conv1.weight": "up_blocks.0.resnets.2.conv1.weight",
        "up_blocks.1.attentions.1.proj_out.weight": "up_blocks.1.attentions.2.proj_out.weight",
        "up_blocks.1.attentions.0.proj_in.weight": "up_blocks.1.attentions.0.proj_in.weight",
    },
    "bk_base": {"mid_block.attentions.0.proj_in.weight": "mid_block.attentions.0.proj_in.weight"},
    "bk_tiny": {
        "up_blocks.0.resnets.0.conv1.weight": "up_blocks.1.resnets.0.conv1.weight",
        "up_blocks.0.resnets.1.conv_shortcut.weight": "up_blocks.1.resnets.2.conv_shortcut.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "up_blocks.2.attentions.1.proj_out.weight": "up_blocks.3.attentions.2.proj_out.weight",
        "down_blocks.2.attentions.0.proj_out.weight": "down_blocks.2.attentions.0.proj_out.weight",
        "conv_out.weight": "conv_out.weight",
    },
}


@pytest.mark.parametrize("pipeline", ["tiny-sd", "tiny-sd2"])
@pytest.mark.parametrize("name", STUDENTS)
def test_each_student_tensor_equals_its_teacher_tensor(assets, pipeline, name):
    teacher = UNet2DConditionModel.from_pretrained(assets[pipeline], subfolder="unet")
    student = UNet2DConditionModel.from_config(bk.student_unet_config(teacher.config, name))
    mapping = bk.copy_weights_from_teacher(student, teacher)
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    assert set(mapping) == set(student_state)
    for key, source in mapping.items():
        assert torch.equal(student_state[key], teacher_state[source]), key
    for key, source in EXPECTED_SOURCES[name].items():
        assert mapping[key] == source
    assert not any(".resnets.1." in source for key, source in mapping.items() if key.startswith("down_blocks"))


def test_uncovered_student_tensor_is_one_line_error(assets):
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    student = UNet2DConditionModel.from_config(bk.student_unet_config(teacher.config, "bk_small"))
    full_state = teacher.state_dict()
    teacher.state_dict = lambda: {k: v for k, v in full_state.items() if k != "up_blocks.2.resnets.2.conv1.weight"}
    with pytest.raises(ValueError) as excinfo:
        bk.copy_weights_from_teacher(student, teacher)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "1 student tensor(s) uncovered: up_blocks.2.resnets.1.conv1.weight" in message


# ----------------------------------------------------------------------------------------------------------
# Feature pairs and the loss
# ----------------------------------------------------------------------------------------------------------

EXPECTED_PAIRS = {
    "bk_small": [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)]
                + [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)],
    "bk_tiny": [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                ("down_blocks.2.attentions.0.proj_out", "down_blocks.2.attentions.1.proj_out"),
                ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3")],
}
EXPECTED_PAIRS["bk_base"] = EXPECTED_PAIRS["bk_small"]


def kd_setup(assets, pipeline, name, lambdas=(1.0, 1.0, 1.0), gradient_checkpointing=False):
    teacher = UNet2DConditionModel.from_pretrained(assets[pipeline], subfolder="unet").eval().requires_grad_(False)
    student = bk.make_student_unet(teacher, name).train()
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    pairs = bk.feature_pairs(student.config, teacher.config)
    ctx = bk.KDContext(
        unet=student, teacher_unet=teacher,
        noise_scheduler=DDPMScheduler.from_pretrained(assets[pipeline], subfolder="scheduler"),
        student_features=bk.FeatureRecorder(student, [s for s, _ in pairs]),
        teacher_features=bk.FeatureRecorder(teacher, [t for _, t in pairs]),
        pairs=pairs, lambda_sd=lambdas[0], lambda_kd_output=lambdas[1], lambda_kd_feat=lambdas[2],
        autocast=contextlib.nullcontext,
    )
    return ctx


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("name", STUDENTS)
def test_feature_pairs_match_in_shape_and_train_every_parameter(assets, name, gradient_checkpointing):
    ctx = kd_setup(assets, "tiny-sd", name, gradient_checkpointing=gradient_checkpointing)
    assert ctx.pairs == EXPECTED_PAIRS[name]
    shapes = {}

    def spy(recorder, side):
        original = recorder.pop

        def pop():
            features = original()
            shapes.update({(side, k): (tuple(v.shape), v.requires_grad) for k, v in features.items()})
            return features

        recorder.pop = pop

    spy(ctx.student_features, "student")
    spy(ctx.teacher_features, "teacher")
    torch.manual_seed(0)
    loss, terms = bk.bk_sdm_loss(ctx, torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32))
    for s, t in ctx.pairs:
        assert shapes[("student", s)][0] == shapes[("teacher", t)][0], (s, t)
        assert shapes[("student", s)][1] and not shapes[("teacher", t)][1]
    assert all(torch.isfinite(v) for v in terms.values()) and terms["loss_kd_feat"] > 0
    loss.backward()
    no_grad = [n for n, p in ctx.unet.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient (DDP would fail): {no_grad[:3]}"


def independent_terms(ctx, latents, embeds, seed):
    """The three loss terms from the formulas, with our own noising and our own hooks."""
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (latents.shape[0],)).long()
    alpha_bar = ctx.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    if ctx.noise_scheduler.config.prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    else:
        target = noise
    ctx.student_features.remove()
    ctx.teacher_features.remove()
    captured = {}
    handles = []
    sides = (("s", ctx.unet, [s for s, _ in ctx.pairs]), ("t", ctx.teacher_unet, [t for _, t in ctx.pairs]))
    for side, model, names in sides:
        modules = dict(model.named_modules())
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda m, i, o, key=(side, name): captured.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        student_pred = ctx.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        teacher_pred = ctx.teacher_unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    for handle in handles:
        handle.remove()
    feat = sum(((captured[("s", s)] - captured[("t", t)]) ** 2).mean() for s, t in ctx.pairs)
    return ((student_pred - target) ** 2).mean(), ((student_pred - teacher_pred) ** 2).mean(), feat


@pytest.mark.parametrize("pipeline, name", [("tiny-sd", "bk_tiny"), ("tiny-sd2", "bk_small")])
def test_loss_terms_match_the_formulas(assets, pipeline, name):
    ctx = kd_setup(assets, pipeline, name, lambdas=(0.5, 2.0, 3.0))
    latents, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    torch.manual_seed(7)
    loss, terms = bk.bk_sdm_loss(ctx, latents, embeds)
    sd, out, feat = independent_terms(ctx, latents, embeds, seed=7)
    torch.testing.assert_close(terms["loss_sd"], sd)
    torch.testing.assert_close(terms["loss_kd_output"], out)
    torch.testing.assert_close(terms["loss_kd_feat"], feat)
    torch.testing.assert_close(loss.detach(), 0.5 * sd + 2.0 * out + 3.0 * feat)


def test_without_kd_weights_the_loss_is_the_plain_task_loss(assets):
    ctx = kd_setup(assets, "tiny-sd2", "bk_base", lambdas=(1.0, 0.0, 0.0))
    latents, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    torch.manual_seed(3)
    loss, _ = bk.bk_sdm_loss(ctx, latents, embeds)
    sd, out, feat = independent_terms(ctx, latents, embeds, seed=3)
    assert out > 0 and feat > 0
    torch.testing.assert_close(loss.detach(), sd)


def test_ema_decay_warms_up_then_caps():
    assert bk.ema_decay_at(1, 0.9999) == pytest.approx(2 / 11)
    assert bk.ema_decay_at(90, 0.9999) == pytest.approx(91 / 100)
    assert bk.ema_decay_at(10**6, 0.9999) == 0.9999


# ----------------------------------------------------------------------------------------------------------
# Image folders and start-up errors
# ----------------------------------------------------------------------------------------------------------


def test_image_folder_jsonl_csv_columns_and_missing_files(tmp_path):
    folder = tmp_path / "jsonl"
    records = make_toy_dataset(str(folder), num_images=3, seed=1, captions="jsonl")
    (folder / records[0]["file_name"]).unlink()
    entries = bk.read_image_folder(str(folder), "file_name", "text")
    assert [Path(p).name for p, _, _ in entries] == [r["file_name"] for r in records[1:]]
    assert [c for _, c, _ in entries] == [r["text"] for r in records[1:]]
    assert entries[0][2]["aesthetic"] == records[1]["aesthetic"]  # the row travels as the sample's json
    csv_folder = tmp_path / "csv"
    records = make_toy_dataset(str(csv_folder), num_images=2, seed=1, captions="csv")
    assert [c for _, c, _ in bk.read_image_folder(str(csv_folder), "file_name", "text")] == [r["text"] for r in records]
    with pytest.raises(bk.DataError, match=r"no column 'caption' \(columns: file_name, text"):
        bk.read_image_folder(str(csv_folder), "file_name", "caption")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(bk.DataError, match="has no metadata.jsonl or metadata.csv"):
        bk.read_image_folder(str(empty), "file_name", "text")
    (empty / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(bk.DataError, match="none of the 1 images listed in metadata.jsonl exists"):
        bk.read_image_folder(str(empty), "file_name", "text")


def test_image_folder_far_below_the_resolution_is_one_warning(tmp_path, caplog):
    """Two 1x1 placeholders and a 10x40 image among toy pictures (96-128 px) at --resolution 64: one line with
    the count, the smallest image and the resolution; --min_image_size, which skips the placeholders, leaves
    the 10x40 one; no small image, no line."""
    import logging
    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from PIL import Image

    folder = tmp_path / "folder"
    records = make_toy_dataset(str(folder), num_images=3, seed=1, captions="jsonl")
    with open(folder / "metadata.jsonl", "a") as f:
        for name, size in (("dot.png", (1, 1)), ("thin.png", (10, 40)), ("dot2.png", (1, 1))):
            Image.new("RGB", size, (250, 0, 0)).save(folder / name)
            f.write(json.dumps({"file_name": name, "text": "a red thing"}) + "\n")
    args = SimpleNamespace(train_data_dir=str(folder), sdxl=False, image_column="file_name", caption_column="text",
                           resolution=64, min_image_size=0, max_train_samples=None)
    PartialState()  # the run's Accelerator exists when data_source runs
    try:
        with caplog.at_level(logging.WARNING):
            _, samples_per_epoch = bk.data_source(args)
            args.min_image_size = 2
            bk.data_source(args)
            args.resolution = 40  # 10 px is a quarter of it: not far below
            bk.data_source(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert samples_per_epoch == len(records) + 3  # a warning, not a filter
    assert [r.getMessage().removeprefix("[RANK 0] ") for r in caplog.records] == [
        f"3 of 6 images in {folder} are under 1/4 of --resolution 64 on their shorter side (the smallest: dot.png, "
        "1x1): resized up that far they train as blur or flat colour; --min_image_size skips them",
        f"1 of 4 images in {folder} are under 1/4 of --resolution 64 on their shorter side (the smallest: thin.png, "
        "10x40): resized up that far they train as blur or flat colour; --min_image_size skips them"]


def parse_error(capsys, argv):
    return rejection_line(bk, argv, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--unet_config_name", "bk_huge"], "argument --unet_config_name: invalid choice: 'bk_huge'"),
        (["--train_data_dir", "{images}", "--caption_column", "caption"],
         "--train_data_dir: metadata.jsonl has no column 'caption' (columns: file_name, text"),
        (["--train_data_dir", "/no/such/folder"], "--train_data_dir: no such directory: /no/such/folder"),
        (["--train_data_dir", "{images}", "--train_shards_path_or_url", "{shards}"], "give exactly one data source"),
        ([], "give exactly one data source"),
        (["--train_shards_path_or_url", "/no/such/shard.tar", "--max_train_steps", "1"],
         "--train_shards_path_or_url: shard not found: /no/such/shard.tar"),
        (["--train_shards_path_or_url", "{shards}", "--max_train_steps", "1", "--caption_column", "text"],
         "--image_column and --caption_column apply to --train_data_dir only"),
        (["--train_data_dir", "{images}", "--lambda_kd_feat", "-1"], "--lambda_kd_feat: must be >= 0"),
        (["--train_data_dir", "{images}", "--lambda_sd", "0", "--lambda_kd_output", "0", "--lambda_kd_feat", "0"],
         "nothing would be learned"),
    ],
)
def test_bad_flags_are_one_line_errors(assets, capsys, tmp_path, extra, message):
    extra = [e.format(images=assets["images"], shards=assets["shards"]) for e in extra]
    argv = ["--pretrained_teacher_model", assets["tiny-sd"], "--output_dir", str(tmp_path / "o"), *extra]
    assert message in parse_error(capsys, argv)


def test_missing_teacher_is_one_line_error(assets, capsys, tmp_path):
    argv = ["--pretrained_teacher_model", str(tmp_path / "nope"), "--train_data_dir", assets["images"]]
    assert "--pretrained_teacher_model: no such directory" in parse_error(capsys, argv)


def test_defaults_follow_the_paper_recipe(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir is relative: keep it out of the repository
    args = bk.parse_args(["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_data_dir", assets["images"]])
    assert args.pretrained_teacher_model == assets["tiny-sd"]
    assert (args.lambda_sd, args.lambda_kd_output, args.lambda_kd_feat) == (1.0, 1.0, 1.0)
    assert args.learning_rate == 5e-5 and args.lr_scheduler == "constant" and args.unet_config_name == "bk_small"
    assert (args.image_column, args.caption_column) == ("file_name", "text") and args.copy_weight_from_teacher


# ----------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------


def common_flags(teacher, output_dir):
    return [
        "--pretrained_teacher_model", teacher,
        "--output_dir", output_dir,
        "--resolution", "64",
        "--train_batch_size", "2",
        "--seed", "0",
        "--shuffle_buffer_size", "4",
        "--validation_prompts", "a red circle",
        "--num_validation_inference_steps", "2",
    ]


def unet_weights(path):
    return load_file(str(Path(path) / "diffusion_pytorch_model.safetensors"))


def generate(pipeline_dir, **kwargs):
    """What the README tells users: load the output directory as a pipeline and generate."""
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def ddp_run(assets, tmp_path_factory):
    """bk_small from shards on 2 processes (DDP over gloo), EMA, gradient checkpointing, checkpoints every step."""
    output_dir = tmp_path_factory.mktemp("bk_ddp") / "run"
    flags = common_flags(assets["tiny-sd"], output_dir) + [
        "--unet_config_name", "bk_small",
        "--train_shards_path_or_url", assets["shards"],
        "--max_train_steps", "3",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--use_ema",
        "--gradient_checkpointing",
        "--dataloader_num_workers", "1",
        "--validation_steps", "0",
    ]
    result = run_script(SCRIPT, flags, num_processes=2)
    return {"output_dir": output_dir, "log": result.stdout}


@pytest.mark.slow
def test_ddp_run_outputs_a_loadable_smaller_pipeline(ddp_run, assets):
    out = ddp_run["output_dir"]
    assert "Num processes: 2" in ddp_run["log"] and "MULTI_CPU" in ddp_run["log"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    for checkpoint in ("checkpoint-2", "checkpoint-3"):
        assert (out / checkpoint / "unet" / "config.json").is_file()
        assert (out / checkpoint / "unet_ema" / "config.json").is_file()
    model_index = json.loads((out / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["mid_block_type"] is None and config["layers_per_block"] == 1
    images = generate(out)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    student = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    assert bk.count_parameters(student) < 0.6 * bk.count_parameters(teacher)
    # the VAE and text encoder are the teacher's, untouched
    for part in ("vae", "text_encoder"):
        ours = load_file(str(next((out / part).glob("*.safetensors"))))
        theirs = load_file(str(next((Path(assets["tiny-sd"]) / part).glob("*.safetensors"))))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_ddp_run_learns_logs_each_term_and_writes_card(ddp_run, assets):
    out = ddp_run["output_dir"]
    online, ema = unet_weights(out / "unet"), unet_weights(out / "unet_ema")
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    initial = bk.make_student_unet(teacher, "bk_small").state_dict()
    moved = [k for k in online if not torch.equal(online[k], initial[k])]
    assert moved, "no student weight changed in 3 steps"
    key = moved[0]
    assert not torch.equal(ema[key], online[key]) and not torch.equal(ema[key], initial[key])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_sd", "train/loss_kd_output", "train/loss_kd_feat"} <= scalars
    assert len(events.Scalars("train/loss_kd_feat")) == 3
    card = (out / "README.md").read_text()
    assert "student (bk_small)" in card and f"{bk.count_parameters(teacher):,}" in card
    assert "1.0 x task + 1.0 x output KD + 1.0 x feature KD" in card
    assert "validation/step_000003.png" in card
    from PIL import Image

    assert Image.open(out / "validation" / "step_000003.png").size == (3 * 64, 64)  # teacher, student, EMA


@pytest.fixture(scope="module")
def folder(assets, tmp_path_factory):
    """The toy images plus one corrupt image and one listed-but-missing file."""
    folder = tmp_path_factory.mktemp("bk_folder") / "images"
    shutil.copytree(assets["images"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "broken"}) + "\n")
        f.write(json.dumps({"file_name": "missing.png", "text": "missing"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_folder_run(assets, folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bk_tiny") / "run"
    flags = common_flags(assets["tiny-sd"], output_dir) + [
        "--unet_config_name", "bk_tiny",
        "--train_data_dir", str(folder),
        "--center_crop", "--random_flip",
        "--max_train_steps", "3",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--use_ema", "--ema_decay", "0.9",
        "--dataloader_num_workers", "0",
        "--validation_steps", "2",
        "--report_to", "none",
    ]
    result = run_in_process(SCRIPT, flags)
    return {"output_dir": output_dir, "flags": flags, "log": result.stdout}


@pytest.mark.slow
def test_bk_tiny_from_image_folder(tiny_folder_run, assets):
    out = tiny_folder_run["output_dir"]
    assert "1 of 14 images listed in metadata.jsonl are missing" in tiny_folder_run["log"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert state["global_step"] == 3
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_000002.png", "step_000003.png"]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert len(config["down_block_types"]) == 3
    images = generate(out)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    ema_unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet_ema")
    ema_images = generate(out, unet=ema_unet)
    assert ema_images.shape == (1, 64, 64, 3) and not np.array_equal(images, ema_images)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tiny_folder_run, tmp_path):
    original = tiny_folder_run["output_dir"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(original / "checkpoint-2", resumed / "checkpoint-2")
    flags = [str(resumed) if str(f) == str(original) else str(f) for f in tiny_folder_run["flags"]]
    assert str(resumed) in flags
    flags += ["--resume_from_checkpoint", "latest"]
    result = run_in_process(SCRIPT, flags)
    assert "resuming from" in result.stdout and "checkpoint-2" in result.stdout
    for name in ("unet", "unet_ema"):
        expected, got = unet_weights(original / name), unet_weights(resumed / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key} differs after resume"
    expected_state = json.loads((original / "checkpoint-3" / "training_state.json").read_text())
    assert json.loads((resumed / "checkpoint-3" / "training_state.json").read_text()) == expected_state


@pytest.mark.slow
def test_bk_base_v_prediction_random_init_csv_folder(assets, tmp_path):
    folder = tmp_path / "csv"
    make_toy_dataset(str(folder), num_images=4, seed=2, captions="csv")
    out = tmp_path / "base"
    flags = common_flags(assets["tiny-sd2"], out)
    seed_at = flags.index("--seed")
    del flags[seed_at:seed_at + 2]  # the BK-SDM reference script crashed without --seed
    flags += [
        "--unet_config_name", "bk_base",
        "--train_data_dir", str(folder),
        "--no_copy_weight_from_teacher",
        "--num_train_epochs", "1",
        "--dataloader_num_workers", "0",
        "--validation_prompts",
        "--report_to", "none",
    ]
    result = run_in_process(SCRIPT, flags)
    assert "2 steps" in result.stdout  # one epoch of 4 images at batch 2
    assert not (out / "validation").exists() and not (out / "unet_ema").exists()
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd2"], subfolder="unet")
    copied = bk.make_student_unet(teacher, "bk_base").state_dict()
    trained = unet_weights(out / "unet")
    # 2 steps at lr 5e-5 move a weight by ~1e-4: far-off convolutions mean they did not start at the teacher's.
    # (Up blocks: the tiny teacher and the student share seed 0, so layers built before the first removed one
    # draw the same random numbers.)
    convolutions = [k for k in copied if k.startswith("up_blocks") and k.endswith("conv1.weight")]
    assert all(not torch.allclose(trained[k], copied[k], atol=1e-2) for k in convolutions)
    assert "started from\nrandom weights" in (out / "README.md").read_text()
    images = generate(out)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_filter_rejecting_every_image_is_one_clear_error(assets, tmp_path):
    flags = common_flags(assets["tiny-sd"], tmp_path / "out") + [
        "--train_data_dir", assets["images"], "--min_aesthetic_score", "100", "--max_train_steps", "1",
        "--dataloader_num_workers", "0",
    ]
    result = run_in_process(SCRIPT, flags, check=False)
    assert result.returncode != 0
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: a whole pass") and "12 filtered out" in last, last
    assert "Traceback" not in result.stdout and not (tmp_path / "out" / "unet").exists()


@pytest.mark.slow
def test_ema_starts_from_the_copied_student(assets, tmp_path):
    """After one step, EMA = d * initial + (1 - d) * trained with d = min(decay, 2/11): the EMA began at the
    teacher-initialised student (the reference script built it before the weight copy, from random weights)."""
    out = tmp_path / "ema"
    flags = common_flags(assets["tiny-sd"], out) + [
        "--unet_config_name", "bk_small", "--train_shards_path_or_url", assets["shards"], "--max_train_steps", "1",
        "--use_ema", "--dataloader_num_workers", "0", "--validation_prompts", "--report_to", "none",
    ]
    run_in_process(SCRIPT, flags)
    teacher = UNet2DConditionModel.from_pretrained(assets["tiny-sd"], subfolder="unet")
    initial = bk.make_student_unet(teacher, "bk_small").state_dict()
    trained, ema = unet_weights(out / "unet"), unet_weights(out / "unet_ema")
    decay = 2 / 11
    for key in trained:
        torch.testing.assert_close(ema[key], decay * initial[key] + (1 - decay) * trained[key])
