"""The shard stream over several passes, with and without DataLoader workers (issue 21): its data counts keep
counting after the first batch, a resumed stream yields exactly the batches an uninterrupted one yields after
the same number of batches, shards of mixed making are refused whatever the worker count, an unreadable first
sample does not hide precomputed shards from the start-up check, and --random_flip on latents without mirror
images is refused before the first batch. The end-to-end tests resume full LCD, LCM-LoRA and BK-SDM runs after
the stream has wrapped around its data, with 2 loader workers, and compare the weights bit for bit."""

import io
import itertools
import json
import shutil
import tarfile
from argparse import Namespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import precompute_latents as tool
import train_lcm_distill_sd_wds as lcd
from conftest import run_in_process

# ---- shards with bad samples of every kind ------------------------------------------------------------------


def write_tar(path, samples):
    """A shard from [(key, {extension: bytes})], members in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), (value, 255 - value, 7 * value % 256)).save(buffer, "PNG")
    return buffer.getvalue()


# what each shard below holds besides its 2 trainable samples (one of them without a caption); every shard ends
# with a trainable sample, so a batch of 2 ends each shard and carries exactly that shard's counts
BAD_PER_SHARD = {"n_corrupt": 1, "n_malformed": 1, "n_filtered": 1, "n_stalled": 0, "n_uncaptioned": 1, "n_not_utf8": 0}
SAMPLE_FILTER = dict(min_image_size=0, max_watermark_probability=None, min_aesthetic_score=5.0)


def write_bad_shards(directory, num_shards=4):
    """`num_shards` shards, each: an unreadable image, a captioned image, malformed json, an image the aesthetic
    filter rejects, and an image without any caption (trained unconditionally, counted)."""
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(num_shards):
        urls.append(write_tar(directory / f"bad-{s}.tar", [
            (f"s{s}_broken", {"png": b"\x89PNG\r\n not an image", "txt": b"broken"}),
            (f"s{s}_good", {"png": png(40 * s + 1), "txt": f"picture {s}".encode()}),
            (f"s{s}_malformed", {"png": png(40 * s + 2), "json": b"[1, 2]"}),
            (f"s{s}_ugly", {"png": png(40 * s + 3), "txt": b"ugly", "json": b'{"aesthetic": 1.0}'}),
            (f"s{s}_nocaption", {"png": png(40 * s + 4), "json": b'{"width": 24, "height": 20}'}),
        ]))
    return urls


def loader(stream, num_workers):
    """The scripts' DataLoader (stream_dataloader: the reference making is found here, before the workers start)."""
    args = Namespace(dataloader_num_workers=num_workers)
    return lcd.stream_dataloader(stream, args, Namespace(device=torch.device("cpu")))


def take(dataloader, count):
    """The first `count` batches; the workers shut down also after an error (as the scripts do), not left to the
    garbage collector while an exception keeps the iterator alive."""
    iterator = iter(dataloader)
    try:
        return list(itertools.islice(iterator, count))
    finally:
        lcd.close_batches(iterator)


def counts_of(batch):
    return {key: int(batch[key]) for key in lcd.new_data_counts()}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counts_over_several_passes_equal_the_bad_samples(tmp_path, num_workers):
    urls = write_bad_shards(tmp_path)
    passes = 3
    total = passes * len(urls)  # one batch per shard and pass

    def batches(skip):
        stream = lcd.ShardStream(urls, 2, lcd.ImageTransform(16), lcd.SampleFilter(**SAMPLE_FILTER), seed=3,
                                 shuffle_buffer_size=0, skip_batches=skip)
        return take(loader(stream, num_workers), total - skip)

    uninterrupted = batches(0)
    # every batch carries its own shard's counts (they used to stop after each reader's first batch)
    assert [counts_of(b) for b in uninterrupted] == [BAD_PER_SHARD] * total
    summed = {key: sum(int(b[key]) for b in uninterrupted) for key in BAD_PER_SHARD}
    assert summed == {key: passes * len(urls) * n for key, n in BAD_PER_SHARD.items()}
    # a stream resumed after 5 batches (one pass and one batch: an odd count, after a wrap) yields the same
    # batches, in the same order, with the counts of what it did not skip
    resumed = batches(5)
    for expected, got in zip(uninterrupted[5:], resumed, strict=True):
        assert got["captions"] == expected["captions"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert counts_of(got) == counts_of(expected)


def test_resumed_stream_equals_uninterrupted_one_after_any_batch_count(assets):
    """With 2 and 3 workers, a shuffle buffer, batches that straddle shards and passes, and skip counts of every
    remainder, in the first pass and after it: the round robin of a resumed DataLoader starts at worker 0."""
    urls = assets["shard_paths"] * 3  # 6 shards of 6 samples (each file listed three times)
    for num_workers, skips in ((2, (1, 3, 8, 13)), (3, (4, 8))):
        def batches(skip, count):
            stream = lcd.ShardStream(urls, 5, lcd.ImageTransform(8, random_flip=True), seed=1,
                                     shuffle_buffer_size=3, skip_batches=skip, proportion_empty_prompts=0.3)
            return [(b["captions"], b["pixel_values"]) for b in take(loader(stream, num_workers), count)]

        uninterrupted = batches(0, 16)  # 36 samples a pass: 7.2 batches
        for skip in skips:
            resumed = batches(skip, 16 - skip)
            assert [c for c, _ in resumed] == [c for c, _ in uninterrupted[skip:]], (num_workers, skip)
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, uninterrupted[skip:])), (num_workers, skip)


# ---- precomputed shards: one reference making for every reader --------------------------------------------


@pytest.fixture(scope="module")
def precomputed(assets, tmp_path_factory):
    """The first raw shard (6 samples) precomputed three ways, 2 shards of 3 each: 64 px with mirror images,
    32 px with mirror images, 64 px without."""
    root = tmp_path_factory.mktemp("stream_precomputed")
    made = {}
    for name, extra in (("at64", ["--resolution", "64", "--random_flip"]),
                        ("at32", ["--resolution", "32", "--random_flip"]), ("single", ["--resolution", "64"])):
        tool.main(["--pretrained_model_name_or_path", assets["tiny-sd"], "--train_shards_path_or_url",
                   assets["shard_paths"][0], "--center_crop", "--latent_dtype", "float32", "--samples_per_shard", "3",
                   "--device", "cpu", "--output_dir", str(root / name), *extra])
        made[name] = sorted(str(p) for p in (root / name).glob("latents-*.tar"))
        assert len(made[name]) == 2
    made["root"] = root
    return made


def first_key(url):
    with tarfile.open(url) as tar:
        return tar.getmembers()[0].name.split(".", 1)[0]


def precomputed_stream(urls, random_flip=True, shuffle_buffer_size=0):
    return lcd.ShardStream(urls, 2, lcd.ImageTransform(64, center_crop=True, random_flip=random_flip),
                           shuffle_buffer_size=shuffle_buffer_size)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mixed_makings_are_refused_whatever_the_worker_count(assets, precomputed, num_workers):
    """Each of the 2 workers reads one of the 2 shards: compared with the first sample each worker read, every
    worker found its own shard consistent and the run trained on the mix."""
    cases = {
        "two precompute settings": [precomputed["at64"][0], precomputed["at32"][1]],
        "precomputed, then raw": [precomputed["at64"][0], assets["shard_paths"][1]],
        "raw, then precomputed": [assets["shard_paths"][1], precomputed["at64"][0]],
    }
    for case, urls in cases.items():
        with pytest.raises((lcd.DataError, RuntimeError), match="mixed shards") as excinfo:
            take(loader(precomputed_stream(urls), num_workers), 8)
        last_line = str(excinfo.value).strip().splitlines()[-1]
        # named against the first readable sample of the shard list, the same for every reader
        assert f"first readable sample ({first_key(urls[0])} in {urls[0]})" in last_line, (case, last_line)
    same = take(loader(precomputed_stream(precomputed["at64"]), num_workers), 4)
    assert all(b["latent_mean"].shape == (2, 4, 8, 8) for b in same)


def corrupt_first_record(source_url, path, how):
    """A copy of a precomputed shard whose first sample is unreadable in one of several ways."""
    with tarfile.open(source_url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken_key = members[0][0].split(".", 1)[0]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            key, extension = name.split(".", 1)
            if key == broken_key:
                if how == "truncated record" and extension == "latents.json":
                    data = data[: len(data) // 2]
                elif how == "record without fields" and extension == "latents.json":
                    data = json.dumps({"format_version": 1, "views": 2}).encode()
                elif how == "truncated array" and extension == "latent_mean.npy":
                    data = data[:40]
                elif how == "no record" and extension == "latents.json":
                    continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_unreadable_first_sample_does_not_hide_precomputed_shards(assets, precomputed, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets["tiny-sd"], subfolder="vae")
    for how in ("truncated record", "record without fields", "truncated array", "no record"):
        broken = corrupt_first_record(precomputed["at64"][0], tmp_path / f"{how.replace(' ', '_')}.tar", how)
        shards = f"{broken}::{precomputed['at64'][1]}"
        args = Namespace(train_shards_path_or_url=shards, shard_read_timeout=10.0, resolution=32, center_crop=True,
                         interpolation_type="bilinear", random_flip=True)
        # a run at 32 px on latents made at 64 px is refused at start-up (it trained, and its card said 32)
        with pytest.raises(SystemExit) as excinfo:
            lcd.check_precomputed_data(args, vae, [])
        message = str(excinfo.value.code)
        second_key = f"{int(first_key(broken)) + 1:05d}"  # the reference: the first readable sample
        assert message.startswith(f"error: sample {second_key} in {broken} ") and "\n" not in message, (how, message)
        assert "--resolution 64, but this run has --resolution 32" in message, (how, message)
        assert lcd.check_precomputed_data(Namespace(**{**vars(args), "resolution": 64}), vae, [])  # matching run
        # the stream skips and counts the broken sample and trains on the others
        batches = take(loader(precomputed_stream(lcd.expand_shard_urls(shards)), 2), 2)
        assert sum(int(b["n_corrupt"]) for b in batches) == 1, how
        assert all("latent_mean" in b for b in batches)


def test_shards_of_no_known_making_are_one_line(tmp_path):
    """Samples with neither an image nor precomputed latents (here: captions only) give no reference to compare
    with: after the reader's limit of rejects, one line names what the stream reads."""
    url = write_tar(tmp_path / "captions.tar", [(f"c{i}", {"txt": b"only a caption"}) for i in range(4)])
    stream = lcd.ShardStream([url], 1, lcd.ImageTransform(16), max_rejects_before_first=3)
    with pytest.raises(SystemExit) as excinfo:
        loader(stream, 2)
    message = str(excinfo.value.code)
    assert message == (f"error: none of the first 3 samples of the shards (from {url} on) holds an image (.jpg, "
                       ".jpeg, .png, .webp) or readable precomputed latents: check the shards")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_random_flip_without_mirror_images_is_refused_before_the_first_batch(precomputed, num_workers, capsys):
    stream = precomputed_stream(precomputed["single"], shuffle_buffer_size=1)
    with pytest.raises(SystemExit) as excinfo:
        loader(stream, num_workers)
    message = str(excinfo.value.code)
    url = precomputed["single"][0]
    assert message.startswith(f"error: --random_flip needs mirror images, but sample {first_key(url)} in {url} ")
    assert "\n" not in message
    assert "precompute them with --random_flip" in message
    with pytest.raises(lcd.DataError, match="--random_flip needs mirror images"):  # the stream on its own too
        next(iter(precomputed_stream(precomputed["single"], shuffle_buffer_size=1)))
    batch, = take(loader(precomputed_stream(precomputed["single"], random_flip=False), num_workers), 1)
    assert batch["latent_mean"].shape == (2, 4, 8, 8)


# ---- end to end: resume after the stream wrapped around, 2 loader workers -----------------------------------


def run_and_resume(script, flags, tmp_path, stop_at):
    """Run to the end (a checkpoint at `stop_at`), then resume a copy of that checkpoint to the end in another
    output directory; (uninterrupted dir, resumed dir, uninterrupted log, resumed log)."""
    original, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    first = run_in_process(script, flags + ["--output_dir", original])
    resumed.mkdir()
    shutil.copytree(original / f"checkpoint-{stop_at}", resumed / f"checkpoint-{stop_at}")
    second = run_in_process(script, flags + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert f"resuming from {resumed / f'checkpoint-{stop_at}'} at step {stop_at}" in second.stdout
    return original, resumed, first.stdout, second.stdout


def assert_same_files(original, resumed, name):
    expected, got = load_file(str(original / name)), load_file(str(resumed / name))
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{name}: {key} differs after resume"


def run_flags(teacher, **extra):
    flags = ["--pretrained_teacher_model", teacher, "--resolution", "32", "--train_batch_size", "2",
             "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "7", "--dataloader_num_workers", "2",
             "--report_to", "none", "--validation_prompts"]
    for flag, value in extra.items():
        flags += [f"--{flag}", value]
    return flags


@pytest.mark.slow
def test_full_lcd_resumes_exactly_after_a_wrap_and_records_the_counts(assets, tmp_path):
    """4 shards, 1 batch each and 2 workers: the stream wraps after 4 steps; stopped at 5 (2 workers, an odd
    step: the resumed DataLoader's first batch came from the other worker), resumed to 6."""
    urls = write_bad_shards(tmp_path / "shards")
    flags = run_flags(assets["tiny-sd"], train_shards_path_or_url="::".join(urls), shuffle_buffer_size="0",
                      min_aesthetic_score="5", max_train_steps="6", checkpointing_steps="5")
    original, resumed, log, resumed_log = run_and_resume("train_lcm_distill_sd_wds.py", flags, tmp_path, 5)
    assert_same_files(original / "unet", resumed / "unet", "diffusion_pytorch_model.safetensors")
    assert_same_files(original / "unet_target", resumed / "unet_target", "diffusion_pytorch_model.safetensors")
    # what the checkpoint records: the bad samples of 5 batches (one shard each), not of each reader's first batch
    state = json.loads((original / "checkpoint-5" / "training_state.json").read_text())
    assert {key: state[key] for key in BAD_PER_SHARD} == {key: 5 * n for key, n in BAD_PER_SHARD.items()}
    # the end-of-run summary of both runs: 6 batches' worth, the resumed run's counting on from its checkpoint
    summary = "data: 6 unreadable, 6 with malformed metadata, 6 filtered out, 6 without a caption"
    assert summary in log and summary in resumed_log


@pytest.mark.slow
def test_lcm_lora_resumes_exactly_after_a_wrap(assets, tmp_path):
    """--max_train_samples 4 with 2 workers: each reader's pass is one batch, so the stream wraps after 2 steps;
    stopped at 3 and resumed to 4."""
    flags = run_flags(assets["tiny-sd"], train_shards_path_or_url=assets["shards"], shuffle_buffer_size="3",
                      max_train_samples="4", max_train_steps="4", checkpointing_steps="3", lora_rank="4")
    original, resumed, _, _ = run_and_resume("train_lcm_distill_lora_sd_wds.py", flags, tmp_path, 3)
    assert_same_files(original, resumed, "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_bk_sdm_image_folder_resumes_exactly_after_a_wrap(assets, tmp_path):
    """The image-folder source (the same stream over one-image shards), wrapping after 2 steps, stopped at 3."""
    flags = run_flags(assets["tiny-sd"], train_data_dir=assets["images"], shuffle_buffer_size="3",
                      max_train_samples="4", max_train_steps="4", checkpointing_steps="3", unet_config_name="bk_tiny")
    flags += ["--validation_steps", "0"]
    original, resumed, _, _ = run_and_resume("train_bk_sdm_kd.py", flags, tmp_path, 3)
    assert_same_files(original / "unet", resumed / "unet", "diffusion_pytorch_model.safetensors")
