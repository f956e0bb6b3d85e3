"""train_bk_sdm_kd.py with SDXL teachers: the SSD-1B / Segmind-Vega / KOALA-700M students derived from SDXL's own
config against the published models (parameter counts, and the transformer depths ComfyUI recognises them by), the
layer map, and an end-to-end run on the tiny SDXL pipeline."""

import re
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

import train_bk_sdm_kd as bk
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from make_random_pipeline import PRESETS  # noqa: E402

# ComfyUI's comfy/model_detection.py entries for the published students (the depth of each down layer and each up
# layer, highest resolution first; the mid block: its transformer depth, -1 a single resnet, -2 none)
COMFYUI_DEPTHS = {
    "sdxl": ([0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10),
    "ssd-1b": ([0, 0, 2, 2, 4, 4], [0, 0, 0, 1, 1, 2, 10, 4, 4], -1),
    "vega": ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2], -1),
    "koala-700m": ([0, 2, 5], [0, 0, 2, 2, 5, 5], -2),
}
# published UNet sizes: SSD-1B 1.3B and Vega 0.74B (arXiv:2401.02677; Segmind's Vega card: down 247M, mid 31M,
# up 460M); KOALA-700M 782M (Lee et al., 2023, Table 1)
PUBLISHED = {"ssd-1b": 1.3e9, "vega": 0.745e9, "koala-700m": 782e6}


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def comfyui_depths(unet):
    """(transformer_depth, transformer_depth_output, middle) of a diffusers UNet, read off its modules the way
    ComfyUI's model detection reads an SGM checkpoint: per resnet of each input (down) and output (up) block, the
    transformer blocks of the attention that follows it (0 without one), highest resolution first."""
    def depth(block, layer):
        attentions = getattr(block, "attentions", None)
        return len(attentions[layer].transformer_blocks) if attentions is not None else 0

    down = [depth(block, layer) for block in unet.down_blocks for layer in range(len(block.resnets))]
    up = [depth(block, layer) for block in reversed(unet.up_blocks) for layer in reversed(range(len(block.resnets)))]
    mid = unet.mid_block
    middle = -2 if mid is None else (len(mid.attentions[0].transformer_blocks) if getattr(mid, "attentions", None)
                                      and mid.attentions[0] is not None else -1)
    return down, up, middle


def test_sdxl_students_are_the_published_models():
    """On SDXL base's config (random weights, meta device): the depths ComfyUI recognises each student by, and its
    parameter count, beside the published figure."""
    teacher = meta_unet(PRESETS["sdxl"]["unet"])
    assert comfyui_depths(teacher) == COMFYUI_DEPTHS["sdxl"]
    assert bk.count_parameters(teacher) == 2_567_463_684
    counts = {}
    for name in bk.SDXL_STUDENTS:
        student = meta_unet(bk.student_unet_config(teacher.config, name))
        assert comfyui_depths(student) == COMFYUI_DEPTHS[name], name
        counts[name] = bk.count_parameters(student)
        assert abs(counts[name] - PUBLISHED[name]) / PUBLISHED[name] < 0.03, (name, counts[name])
        if name == "vega":
            parts = [sum(p.numel() for p in part.parameters()) for part in (student.down_blocks, student.mid_block,
                                                                             student.up_blocks)]
            assert [round(n / 1e6) for n in parts] == [247, 31, 460]
    assert counts == {"ssd-1b": 1_331_334_404, "vega": 745_225_604, "koala-700m": 782_822_724}


def test_the_rule_scales_to_other_teacher_depths():
    """A teacher of other depths (the tiny SDXL pipeline: 1, 1 and 2 blocks per attention level): each kept
    attention keeps the published share of the teacher's depth, rounded up, at least one block."""
    tiny = PRESETS["tiny-sdxl"]["unet"]
    depths = {name: comfyui_depths(meta_unet(bk.student_unet_config(tiny, name))) for name in bk.SDXL_STUDENTS}
    assert comfyui_depths(meta_unet(tiny)) == ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2], 2)
    assert depths["ssd-1b"] == ([0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 2, 1, 1], -1)  # 4/10 of 2 -> 1; 10/10 -> 2
    assert depths["vega"] == ([0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1], -1)
    assert depths["koala-700m"] == ([0, 1, 1], [0, 0, 1, 1, 1, 1], -2)
    deeper = dict(tiny, transformer_layers_per_block=(1, 4, 20))  # twice SDXL's depths: twice the students'
    assert comfyui_depths(meta_unet(bk.student_unet_config(deeper, "ssd-1b")))[:2] == (
        [0, 0, 4, 4, 8, 8], [0, 0, 0, 2, 2, 4, 20, 8, 8])


@pytest.mark.parametrize("name", bk.SDXL_STUDENTS)
def test_every_sdxl_student_tensor_comes_from_a_teacher_tensor_of_its_shape(name):
    """The layer map on a small random SDXL teacher (depth 3 at level 1, 5 at level 2, so that blocks are dropped
    everywhere): every student tensor is the teacher tensor of the same name, except a 1-resnet student's last up
    layer (<- the teacher's last); kept transformer blocks are the teacher's first ones."""
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(dict(PRESETS["tiny-sdxl"]["unet"], transformer_layers_per_block=(1, 3, 5)))
    student = UNet2DConditionModel.from_config(bk.student_unet_config(teacher.config, name))
    mapping = bk.copy_weights_from_teacher(student, teacher)
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    assert set(mapping) == set(student_state)
    for key, source in mapping.items():
        assert torch.equal(student_state[key], teacher_state[source]), key
        if name != "koala-700m":
            assert source == key
        elif re.match(r"up_blocks\.\d+\.(resnets|attentions)\.1\.", key):
            assert source == re.sub(r"^(up_blocks\.\d+\.\w+)\.1\.", r"\1.2.", key)
    kept = {int(k.split(".")[5]) for k in student_state if k.startswith("up_blocks.0.attentions.0.transformer_blocks")}
    assert kept == set(range(len(student.up_blocks[0].attentions[0].transformer_blocks))) and max(kept) < 4
    if name == "koala-700m":
        assert student.mid_block is None
    else:
        assert type(student.mid_block).__name__ == "UNetMidBlock2D" and len(student.mid_block.resnets) == 1
    sample, embeds = torch.randn(1, 4, 8, 8), torch.randn(1, 77, teacher.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        assert student(sample, 10, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.shape == sample.shape


def test_students_of_the_other_family_are_refused_in_one_line():
    for config, name, expected in ((PRESETS["sd15"]["unet"], "ssd-1b", "defined for the SDXL UNet"),
                                   (PRESETS["sdxl"]["unet"], "bk_small", "SD 1.x/2.x UNet")):
        with pytest.raises(ValueError) as excinfo:
            bk.student_unet_config(config, name)
        assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)
