"""Outcome tests of Latent Consistency Distillation on the trained toy teacher: the distilled student must
sample in 1-2 steps what the teacher samples in 50, far closer than the teacher itself does in 1-2 steps,
and draw what the prompt asks in 4 steps.

Each script runs in process (`main(parse_args(argv))`, the flags a user passes; the launches through
`accelerate launch` are in the scripts' end-to-end tests, and would add ~10 s of imports each); the saved student is
loaded into the real diffusers pipeline (`LCMScheduler`; the LoRA through `load_lora_weights`) and measured with
tools/toy_metrics.py. A sign error in the guidance, a target at the wrong timestep or from the wrong network
fails these tests (see the README's outcome section for the breakages tried). The Phased Consistency (PCM)
student samples deterministically with `TCDScheduler` (eta 0) on its phase edges."""

import pytest

import toy_metrics
from conftest import run_in_process

pytestmark = pytest.mark.slow

SEEDS_PER_PROMPT = 2  # 24 samples per setting
# 70 steps: every student is inside every assertion (1-step distances 0.105 full, 0.110 SDXL against limits 0.117
# and 0.116; at 100 steps 0.107 and 0.107), the breakages in the README are far outside, and CI has a 20-minute
# budget
LCD_STEPS = 70
# the LoRA student with its default EMA adapter target: 1-step distance 0.111 at 70 steps, 0.108 at 100 (limit 0.117;
# with the online target it needed 150 steps to reach 0.101)
LORA_STEPS = 70
NUM_DDIM_TIMESTEPS = 10  # skipping step k = 100: the consistency target reaches t=999 in 10 hops


def lcd_flags(teacher, shards, output_dir, steps):
    return [
        "--pretrained_teacher_model", teacher,
        "--train_shards_path_or_url", shards,
        "--output_dir", output_dir,
        "--resolution", "32", "--train_batch_size", "32", "--max_train_steps", steps,
        "--learning_rate", "5e-4", "--lr_warmup_steps", "10", "--loss_type", "huber",
        "--w_min", "3", "--w_max", "3",  # omega 3 = the teacher's guidance scale 4
        "--num_ddim_timesteps", NUM_DDIM_TIMESTEPS, "--validation_prompts", "a red circle",
        "--dataloader_num_workers", "0", "--checkpointing_steps", "100000", "--validation_steps", "0",
        "--seed", "0",
    ]


@pytest.fixture(scope="module")
def teacher(toy):
    return teacher_rows(toy_metrics.load_pipeline(toy["sd"]))


def teacher_rows(pipe):
    """The teacher's 50-step samples (the reference every distance is measured against; sampled once, they are
    also its 50-step row) and its 1- and 2-step DDIM rows."""
    rows = {50: toy_metrics.evaluate(pipe, "ddim", toy_metrics.TEACHER_STEPS, toy_metrics.TEACHER_GUIDANCE,
                                     seeds_per_prompt=SEEDS_PER_PROMPT)}
    reference = rows[50]["images"]
    rows.update({steps: toy_metrics.evaluate(pipe, "ddim", steps, toy_metrics.TEACHER_GUIDANCE, reference,
                                             seeds_per_prompt=SEEDS_PER_PROMPT) for steps in (1, 2)})
    return {"pipe": pipe, "reference": reference, "rows": rows}


def student_rows(teacher, student, guidance):
    return {steps: toy_metrics.evaluate(student, "lcm", steps, guidance, teacher["reference"],
                                        seeds_per_prompt=SEEDS_PER_PROMPT, num_ddim_timesteps=NUM_DDIM_TIMESTEPS)
            for steps in (1, 2, 4)}


def assert_distilled(teacher, student, label):
    t, s = teacher["rows"], student
    report = (f"{label}: teacher ddim 1/2/50 acc {t[1]['accuracy']:.2f}/{t[2]['accuracy']:.2f}/"
              f"{t[50]['accuracy']:.2f} dist {t[1]['distance']:.3f}/{t[2]['distance']:.3f}; student lcm 1/2/4 acc "
              f"{s[1]['accuracy']:.2f}/{s[2]['accuracy']:.2f}/{s[4]['accuracy']:.2f} dist "
              f"{s[1]['distance']:.3f}/{s[2]['distance']:.3f}/{s[4]['distance']:.3f}")
    print(report)
    # one-step fidelity: the student's 1-step samples are much closer to the teacher's 50-step ones than the
    # teacher's own 1-step samples (the sharp test: the LCM sampler re-noises after the first step)
    assert s[1]["distance"] < 0.8 * t[1]["distance"], report
    # few steps stay close to the teacher's trajectory, and still draw the prompts
    assert s[2]["distance"] < 1.2 * t[2]["distance"], report
    assert min(s[2]["accuracy"], s[4]["accuracy"]) >= t[1]["accuracy"] - 0.2, report


def test_lcd_full_student_samples_in_few_steps_what_teacher_samples_in_50(toy, teacher, tmp_path):
    output_dir = tmp_path / "lcd"
    run_in_process("train_lcm_distill_sd_wds.py", lcd_flags(toy["sd"], toy["shards"], output_dir, LCD_STEPS))
    student, guidance = toy_metrics.load_student(toy["sd"], unet=str(output_dir / "unet_target"))
    assert guidance == toy_metrics.TEACHER_GUIDANCE  # omega = guidance - 1 = 3, what it was trained for
    assert_distilled(teacher, student_rows(teacher, student, guidance), "LCD full")


def test_lcm_lora_student_samples_in_few_steps_what_teacher_samples_in_50(toy, teacher, tmp_path):
    output_dir = tmp_path / "lcm_lora"
    flags = lcd_flags(toy["sd"], toy["shards"], output_dir, LORA_STEPS) + ["--lora_rank", "16"]
    flags[flags.index("--learning_rate") + 1] = "2e-3"
    run_in_process("train_lcm_distill_lora_sd_wds.py", flags)
    student, guidance = toy_metrics.load_student(toy["sd"], lora=str(output_dir))
    assert guidance == 1.0  # LCM-LoRA: guidance is distilled in, no CFG at sampling time
    assert_distilled(teacher, student_rows(teacher, student, guidance), "LCM-LoRA")


def test_lcd_sdxl_student_samples_in_one_step_what_teacher_samples_in_50(toy, tmp_path):
    """The SDXL script on the toy SDXL teacher (two text encoders, text_time micro-conditioning)."""
    output_dir = tmp_path / "lcd_sdxl"
    run_in_process("train_lcm_distill_sdxl_wds.py", lcd_flags(toy["sdxl"], toy["shards"], output_dir, LCD_STEPS))
    sdxl_teacher = teacher_rows(toy_metrics.load_pipeline(toy["sdxl"]))
    student, guidance = toy_metrics.load_student(toy["sdxl"], unet=str(output_dir / "unet_target"))
    assert type(student).__name__ == "StableDiffusionXLPipeline"
    assert_distilled(sdxl_teacher, student_rows(sdxl_teacher, student, guidance), "LCD SDXL")


PCM_STEPS = 70  # PCM converges fast (benchmarks/QUALITY.md); at 70 steps "phases ignored" still fails two checks
PCM_GRID, PCM_PHASES = 8, 4  # 1, 2 and 4 sampling steps all land on phase edges


def test_pcm_full_student_beats_teacher_ddim_at_1_and_2_steps(toy, teacher, tmp_path):
    """Phased Consistency distillation (--num_phases 4): the student's deterministic 1- and 2-step samples (TCD
    sampler, eta 0, on its phase edges) are closer to the teacher's 50-step ones than the teacher's own DDIM at
    the same steps, and still draw the prompts. In process (no launch) to keep CI short."""
    import json

    output_dir = tmp_path / "pcm"
    flags = lcd_flags(toy["sd"], toy["shards"], output_dir, PCM_STEPS)
    flags[flags.index("--num_ddim_timesteps") + 1] = PCM_GRID
    run_in_process("train_lcm_distill_sd_wds.py", flags + ["--num_phases", PCM_PHASES])
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "TCDScheduler" and scheduler["original_inference_steps"] == PCM_GRID
    assert "TCDScheduler" in (output_dir / "README.md").read_text()
    student, guidance = toy_metrics.load_student(toy["sd"], unet=str(output_dir / "unet_target"))
    s = {steps: toy_metrics.evaluate(student, "tcd", steps, guidance, teacher["reference"],
                                     seeds_per_prompt=SEEDS_PER_PROMPT, num_ddim_timesteps=PCM_GRID)
         for steps in (1, 2, 4)}
    t = teacher["rows"]
    report = (f"PCM full: teacher ddim 1/2/50 acc {t[1]['accuracy']:.2f}/{t[2]['accuracy']:.2f}/"
              f"{t[50]['accuracy']:.2f} dist {t[1]['distance']:.3f}/{t[2]['distance']:.3f}; student tcd 1/2/4 acc "
              f"{s[1]['accuracy']:.2f}/{s[2]['accuracy']:.2f}/{s[4]['accuracy']:.2f} dist "
              f"{s[1]['distance']:.3f}/{s[2]['distance']:.3f}/{s[4]['distance']:.3f}")
    print(report)
    # deterministic sampling stays on the teacher's trajectory: closer than the teacher's own DDIM at 1 and 2 steps
    # (measured on 192 samples at 100 steps: 0.121 vs 0.148 at 1 step, 0.075 vs 0.098 at 2; benchmarks/QUALITY.md)
    assert s[1]["distance"] < 0.92 * t[1]["distance"], report
    assert s[2]["distance"] < 0.9 * t[2]["distance"], report
    # and more steps get closer still
    assert s[4]["distance"] < s[1]["distance"], report
    assert min(s[2]["accuracy"], s[4]["accuracy"]) >= t[1]["accuracy"] - 0.2, report
