"""Outcome tests of BK-SDM and DreamBooth LoRA on the trained toy teacher, each script run in process with the flags a
user passes (the launches are in the scripts' end-to-end tests):

* a block-removed student trained with the KD terms ends closer to its teacher, and draws its prompts better,
  than the same student trained as long on the task loss alone;
* a DreamBooth LoRA learned from 4 pictures draws the subject's colour (magenta, which the teacher never drew)
  for the instance prompt "a sks square", where the base model never does; on the SD and the SDXL toy teacher.
"""

import pytest

import toy_metrics
import toy_world
from conftest import run_in_process

pytestmark = pytest.mark.slow

SEEDS_PER_PROMPT = 2
BK_STEPS = 120
BK_SAMPLER_STEPS = 25


def bk_flags(toy, output_dir, lambda_kd):
    return [
        "--pretrained_teacher_model", toy["sd"], "--unet_config_name", "bk_tiny",
        "--train_shards_path_or_url", toy["shards"], "--output_dir", output_dir,
        "--resolution", "32", "--train_batch_size", "16", "--max_train_steps", BK_STEPS,
        "--learning_rate", "5e-4", "--lambda_kd_output", lambda_kd, "--lambda_kd_feat", lambda_kd,
        "--dataloader_num_workers", "0", "--checkpointing_steps", "100000", "--validation_steps", "0", "--seed", "0",
    ]


def test_bk_sdm_student_with_kd_beats_the_same_student_without(toy, tmp_path):
    for label, lambda_kd in (("kd", "1.0"), ("no_kd", "0")):
        run_in_process("train_bk_sdm_kd.py", bk_flags(toy, tmp_path / label, lambda_kd))
    teacher = toy_metrics.load_pipeline(toy["sd"])
    reference = toy_metrics.evaluate(teacher, "ddim", BK_SAMPLER_STEPS, toy_metrics.TEACHER_GUIDANCE,
                                     seeds_per_prompt=SEEDS_PER_PROMPT)
    results = {label: toy_metrics.measure_bk_student(teacher, str(tmp_path / label / "unet"), reference["images"],
                                                     steps=BK_SAMPLER_STEPS, seeds_per_prompt=SEEDS_PER_PROMPT)
               for label in ("kd", "no_kd")}
    report = (f"teacher acc {reference['accuracy']:.2f}; " + "; ".join(
        f"{label} acc {r['accuracy']:.2f} dist {r['distance']:.3f}" for label, r in results.items()))
    print(report)
    # measured at batch 16: KD 0.46 / 0.137 against task loss only 0.25 / 0.155 (teacher 0.58); at batch 32, 0.50 /
    # 0.124 against 0.25 / 0.143; at 90 steps of batch 32 KD led by only 0.09
    assert results["kd"]["accuracy"] >= results["no_kd"]["accuracy"] + 0.1, report
    assert results["kd"]["distance"] < results["no_kd"]["distance"], report


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_dreambooth_lora_draws_the_subject_and_keeps_the_class(kind, toy, tmp_path):
    output_dir = tmp_path / "dreambooth"
    run_in_process("train_dreambooth_lora.py", [
        "--pretrained_model_name_or_path", toy[kind], "--instance_data_dir", toy["subject"],
        "--instance_prompt", toy_world.SUBJECT_PROMPT, "--output_dir", output_dir,
        "--with_prior_preservation", "--class_prompt", toy_world.CLASS_PROMPT,
        "--class_data_dir", tmp_path / "class", "--num_class_images", "16", "--sample_batch_size", "16",
        "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "100", "--rank", "8",
        "--learning_rate", "2e-3", "--checkpointing_steps", "100000", "--seed", "0",
    ])
    result = toy_metrics.measure_dreambooth(toy[kind], str(output_dir))
    report = {k: v for k, v in result.items() if k != "images"}
    print(report)
    assert result["subject_base"] <= 0.1, report  # the teacher never draws magenta
    assert result["subject"] >= 0.5, report
