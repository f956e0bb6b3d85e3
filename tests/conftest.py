"""Session fixtures: tiny random pipelines and WebDataset shards built locally (no network), and two ways
to run a training script: `run_script`, through `accelerate launch` the way a user does, and
`run_in_process`, the same `main(parse_args(argv))` in the test process.

A new Python process re-imports torch, diffusers and transformers: 10 s on an idle laptop, minutes on a
busy 2-core CI machine. Each script therefore has its main run through `accelerate launch`; variants
(resume, other flags, error paths) run in process, where only the training itself costs time."""

import contextlib
import copy
import importlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_random_pipeline import build_pipeline  # noqa: E402
from make_toy_dataset import make_toy_dataset  # noqa: E402
from make_wds_shards import make_shards  # noqa: E402


def launch_env():
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # two pytest workers on two cores: one thread each runs fastest
        ACCELERATE_CONFIG_FILE=str(REPO / "tests" / "no_such_accelerate_config.yaml"),  # ignore ~/.cache config
    )
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_script(script, args, *, launch=True, num_processes=1, timeout=900, check=True):
    """Run a training script as a user would; return the CompletedProcess (stdout+stderr in .stdout)."""
    if launch:
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if num_processes > 1:
            # accelerate 1.15 without CUDA: --multi_gpu alone starts N processes that each believe they are
            # alone (DistributedType.NO); ACCELERATE_USE_CPU makes them one gloo group (MULTI_CPU).
            # (--cpu --num_processes N starts a single process.) Tests assert the process count they got.
            command += ["--multi_gpu", "--num_processes", str(num_processes)]
        else:
            command += ["--cpu", "--num_processes", "1"]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        command = [sys.executable]
    command += [str(REPO / script), *map(str, args)]
    env = launch_env()
    if launch and num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result.stdout = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


class InProcessResult:
    """What a run in this process left: the exit code (0, or SystemExit's) and everything it logged or printed."""

    def __init__(self, returncode, stdout):
        self.returncode = returncode
        self.stdout = stdout


def run_in_process(script, args, *, check=True):
    """`main(parse_args(args))` of a training script in this process, with the accelerate singletons reset
    before and after, so runs do not see each other's state. SystemExit (start-up errors) becomes the
    return code, with its message appended to the output as the script's own `raise SystemExit(msg)` prints it."""
    from accelerate.state import AcceleratorState, GradientState

    module = importlib.import_module(Path(script).stem)
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s - %(name)s - %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    returncode = 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            module.main(module.parse_args([str(a) for a in args]))
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int) and exit_.code is not None:
            captured.write(f"{exit_.code}\n")
    finally:
        module.OutputDirLock.release_all()  # as the end of its process would: the next run may use the dir
        root.removeHandler(handler)
        root.setLevel(previous_level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    result = InProcessResult(returncode, captured.getvalue())
    if check and returncode != 0:
        raise AssertionError(f"{script} failed ({returncode}):\n{result.stdout[-6000:]}")
    return result


def spy_on_optimizer(module, monkeypatch):
    """Record every optimiser a script's make_optimizer builds, and a copy of its per-parameter state right after
    each load_state_dict (what a resumed run actually continues from)."""
    record = {"optimizers": [], "loaded_state": []}
    real_make_optimizer = module.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        real_load = optimizer.load_state_dict

        def load_state_dict(state_dict):
            real_load(state_dict)
            record["loaded_state"].append(copy.deepcopy(list(optimizer.state.values())))

        optimizer.load_state_dict = load_state_dict
        record["optimizers"].append(optimizer)
        return optimizer

    monkeypatch.setattr(module, "make_optimizer", make_optimizer)
    return record


def checkpoint_optimizer_state(checkpoint):
    """(per-parameter states in parameter order, parameter groups without their parameter lists) that accelerate
    wrote into a checkpoint folder. bitsandbytes' state_dict nests its quantisation buffers under one key (to hide
    them from FSDP): flattened back here."""
    saved = torch_load(Path(checkpoint) / "optimizer.bin")
    states = []
    for index in sorted(saved["state"]):
        state = dict(saved["state"][index])
        state.update(state.pop("__bnb_optimizer_quant_state__", {}))
        states.append(state)
    groups = [{key: value for key, value in group.items() if key != "params"} for group in saved["param_groups"]]
    return states, groups


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


def assert_same_state(expected, got):
    """Per-parameter optimiser states (lists of dicts) equal bit for bit, dtypes included."""
    import torch

    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def train_then_resume(script, module, flags, output_dir, tmp_path, monkeypatch, resume_step, weights):
    """Train `flags` to the end in process with checkpoints, then resume a copy of checkpoint-`resume_step` to the
    end in another output dir; return the optimiser records of both runs (spy_on_optimizer), the resumed output
    dir and the (uninterrupted, resumed) final `weights(output_dir)`."""
    uninterrupted = spy_on_optimizer(module, monkeypatch)
    run_in_process(script, flags)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / f"checkpoint-{resume_step}", resumed_dir / f"checkpoint-{resume_step}")
    monkeypatch.undo()  # the resumed run's spy wraps the script's own make_optimizer, not the first spy
    resumed = spy_on_optimizer(module, monkeypatch)
    resumed_flags = [str(resumed_dir) if str(f) == str(output_dir) else str(f) for f in flags]
    result = run_in_process(script, resumed_flags + ["--resume_from_checkpoint", "latest"])
    assert f"checkpoint-{resume_step}" in result.stdout
    return uninterrupted, resumed, resumed_dir, weights(output_dir), weights(resumed_dir)


def assert_resumed_exactly(output_dir, resumed_dir, resumed, resume_step, final_step, expected, got):
    """The resumed run loaded exactly the optimiser state of checkpoint-`resume_step` and ends where the
    uninterrupted run ended: the same final weights and the same optimiser state (groups included: Prodigy keeps
    its step-size estimate there) in the last checkpoint."""
    import torch

    saved, _ = checkpoint_optimizer_state(output_dir / f"checkpoint-{resume_step}")
    assert all(s["step"] == resume_step for s in saved)
    assert_same_state(saved, resumed["loaded_state"][-1])  # prepare() also reloads the (then empty) state
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    final, final_groups = checkpoint_optimizer_state(output_dir / f"checkpoint-{final_step}")
    resumed_final, resumed_groups = checkpoint_optimizer_state(resumed_dir / f"checkpoint-{final_step}")
    assert_same_state(final, resumed_final)
    assert final_groups == resumed_groups


def rejection_line(module, argv, capsys):
    """Parse flags as a script does and return the single stderr line of its rejection (exit code 2)."""
    with pytest.raises(SystemExit) as excinfo:
        module.parse_args([str(a) for a in argv])
    assert excinfo.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# Worker seconds of each test file in a run of the whole suite (2 workers, `--durations=0`, 2026-12-07), heaviest
# first. run_tests.sh passes --no-loadscope-reorder, so xdist hands whole files to the workers in this order and
# the short files fill in at the end: with xdist's own order (most tests first) the few-test, long outcome files
# came last and ran alone on one worker for five minutes. A file not listed counts as FILE_COST_DEFAULT.
FILE_COST = {
    "test_outcome_lcd.py": 270, "test_precision.py": 220, "test_compile.py": 195, "test_scale_out_and_faults.py": 190,
    "test_outcome_kd_dreambooth.py": 185, "test_fsdp.py": 175, "test_dreambooth_lora.py": 110,
    "test_resume_safety.py": 90, "test_dreambooth_sdxl.py": 77, "test_lcm_lora_sd.py": 73, "test_lcm_sdxl.py": 64,
    "test_precompute_latents.py": 63, "test_bk_sdm_sdxl.py": 60, "test_bk_sdm.py": 55, "test_fresh_clone.py": 50,
    "test_lcm_sd_e2e.py": 45, "test_lean_loading.py": 40, "test_stream.py": 35, "test_toy_world.py": 35,
}
FILE_COST_DEFAULT = 30


def pytest_collection_modifyitems(session, config, items):
    """Heaviest files first (a stable sort: each file's own order is kept); every worker sorts alike."""
    items.sort(key=lambda item: -FILE_COST.get(Path(str(item.fspath)).name, FILE_COST_DEFAULT))


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch():
    """One intra-op thread, as the launched runs get from OMP_NUM_THREADS=1: two pytest workers share two
    cores, and the same thread count keeps in-process and launched runs bit-comparable."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_corrupt_shard(path, num_good_from=None):
    """A shard with one image whose bytes are not an image, next to a readable one copied from another shard."""
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("broken.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        add("broken.txt", b"a broken image")
        if num_good_from is not None:
            with tarfile.open(num_good_from) as source:
                for member in source.getmembers()[:3]:
                    add("good_" + member.name, source.extractfile(member).read())


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Paths of the tiny pipelines and shards shared by the whole session."""
    root = tmp_path_factory.mktemp("assets")
    pipelines = {name: build_pipeline(name, str(root / name), seed=0) for name in ("tiny-sd", "tiny-sd2")}
    images = root / "images"
    make_toy_dataset(str(images), num_images=12, seed=0, captions="jsonl")
    shards = make_shards(str(images), str(root / "shards"), samples_per_shard=6)
    corrupt = root / "shards" / "corrupt-00000.tar"
    write_corrupt_shard(corrupt, num_good_from=shards["shards"][0])
    return {
        "root": root,
        "tiny-sd": pipelines["tiny-sd"],
        "tiny-sd2": pipelines["tiny-sd2"],
        "images": str(images),
        "shards": shards["url_pattern"],
        "shard_paths": shards["shards"],
        "corrupt_shard": str(corrupt),
    }


TOY_TEACHERS = REPO / "tools" / "toy_teachers"


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The committed trained toy teachers and toy-world data: distillation shards (every caption names colour
    and shape) and the DreamBooth subject's instance pictures."""
    import toy_world

    root = tmp_path_factory.mktemp("toy")
    toy_world.write_image_folder(str(root / "images"), 512, seed=11)
    shards = make_shards(str(root / "images"), str(root / "shards"), samples_per_shard=128)
    return {
        "sd": str(TOY_TEACHERS / "toy-sd"),
        "sdxl": str(TOY_TEACHERS / "toy-sdxl"),
        "shards": shards["url_pattern"],
        "subject": toy_world.write_subject_folder(str(root / "subject")),
        "root": root,
    }
