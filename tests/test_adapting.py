"""docs/ADAPTING.md cannot go stale: its worked example (PixArt-alpha LCM-LoRA from train_lcm_distill_lora_sd_wds.py)
is executed here, block by block, on top of the script's own text, exactly as a copier would apply it, with no
ENGINE, DATA or LCD change. On a tiny PixArt pipeline built offline (PixArtTransformer2DModel, T5, a tokenizers
T5 tokenizer, the tiny SD VAE, a DPM-Solver scheduler config like the Hub's), the adapted script's hooks run the
LCD loss, switch the adapters off and on, and save and load the adapter; then the adapted script trains,
checkpoints, resumes exactly, validates with PixArtAlphaPipeline and writes an adapter that peft loads."""

import contextlib
import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, rejection_line, run_in_process

DOC = REPO / "docs" / "ADAPTING.md"
BASE_SCRIPT = REPO / "train_lcm_distill_lora_sd_wds.py"
# every word of the toy captions is one piece, and single letters cover anything else
WORDS = ("a photo of the red green blue yellow circle square triangle star on in with and small big dark light "
         "background shape").split()


def doc_python_blocks():
    """The ```python blocks of the worked example (``` or ```` fences), in order."""
    text = DOC.read_text(encoding="utf-8")
    example = text[text.index("## Worked example"):]
    return [m.group(2) for m in re.finditer(r"^(`{3,})python\n(.*?)^\1[ \t]*$", example, re.M | re.S)]


def adapted_script():
    """A module: the LoRA script's text, then the document's blocks, each replacing the definitions it names.
    Registered as a module (run_in_process imports scripts by name)."""
    import sys

    module = types.ModuleType("train_lcm_distill_lora_pixart_wds")
    module.__file__ = str(BASE_SCRIPT)
    sys.modules[module.__name__] = module  # dataclasses resolve their module through sys.modules
    exec(compile(BASE_SCRIPT.read_text(encoding="utf-8"), str(BASE_SCRIPT), "exec"), module.__dict__)
    for number, block in enumerate(doc_python_blocks(), 1):
        exec(compile(block, f"{DOC}:block{number}", "exec"), module.__dict__)
    return module


def build_tiny_pixart(path, sd_pipeline):
    """A PixArtAlphaPipeline folder with random weights, small enough to train on a CPU in seconds."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -4.0)]
    vocab += [("\u2581" + word, -2.0) for word in WORDS]
    vocab += [(char, -6.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789,.-"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = T5Tokenizer(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            extra_ids=0, model_max_length=120)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, norm_num_groups=8, cross_attention_dim=16, sample_size=8,
                                           patch_size=2, caption_channels=32)
    vae = AutoencoderKL.from_pretrained(sd_pipeline, subfolder="vae")
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon")  # as the Hub's
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler).save_pretrained(path)
    (Path(path) / "validation_prompts.txt").write_text("a red circle\n")
    return str(path)


@pytest.fixture(scope="module")
def pixart(assets, tmp_path_factory):
    return build_tiny_pixart(tmp_path_factory.mktemp("pixart") / "tiny-pixart", assets["tiny-sd"])


@pytest.fixture(scope="module")
def adapted():
    return adapted_script()


def flags(pixart, assets, output_dir, *extra):
    return ["--pretrained_teacher_model", pixart, "--train_shards_path_or_url", assets["shards"],
            "--output_dir", output_dir, "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
            "--lora_rank", "4", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--shuffle_buffer_size", "4",
            "--dataloader_num_workers", "0", "--num_ddim_timesteps", "10", "--report_to", "none",
            "--max_train_steps", "2", *extra]


def lora_output(model, latents, timesteps, conditioning, adapted):
    with torch.no_grad():
        return adapted.denoiser_forward(model, latents, timesteps, call=adapted.pixart_call, **conditioning)


def test_the_document_is_the_adaptation_and_its_hooks_work(adapted, pixart, assets, tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    blocks = doc_python_blocks()
    assert len(blocks) >= 10 and "def pixart_call" in "".join(blocks)
    assert "region" not in "".join(blocks)  # the example touches no region
    # start-up checks through the METHOD's parameters: the teacher kind and the resolution multiple
    line = rejection_line(adapted, flags(assets["tiny-sd"], assets, tmp_path / "a"), capsys)
    assert "holds a StableDiffusionPipeline; expected a PixArt-alpha pipeline folder" in line
    line = rejection_line(adapted, flags(pixart, assets, tmp_path / "b", "--resolution", "72"), capsys)
    assert line.endswith("--resolution must be a positive multiple of 16 (the VAE downsamples by 8 and the "
                         "denoiser takes patches of 2 latent pixels), got 72")
    args = adapted.parse_args([str(f) for f in flags(pixart, assets, tmp_path / "c")])
    adapted.OutputDirLock.release_all()

    noise_scheduler, tokenizer, text_encoder, vae, transformer = adapted.load_models(args, torch.float32)
    assert type(transformer).__name__ == "PixArtTransformer2DModel"
    assert noise_scheduler.config.num_train_timesteps == 1000 and "solver_order" not in noise_scheduler.config
    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    ctx = adapted.make_lcd_context(args, noise_scheduler, transformer, transformer, transformer, w_embedding_dim=0,
                                   device="cpu", autocast=contextlib.nullcontext,
                                   teacher_is_student_without_adapters=True, denoiser_call=adapted.pixart_call)
    embeddings, mask = adapted.encode_prompts(text_encoder, tokenizer, ["a red circle", "a big blue square on green"])
    assert embeddings.shape[:2] == mask.shape == (2, 120) and mask.sum(1).tolist()[0] < mask.sum(1).tolist()[1]
    uncond = [t.expand(2, *t.shape[1:]) for t in adapted.encode_prompts(text_encoder, tokenizer, [""])]
    cond = {"encoder_hidden_states": embeddings, "encoder_attention_mask": mask}
    torch.manual_seed(0)
    loss = adapted.lcd_loss(ctx, torch.randn(2, 4, 8, 8), cond,
                            {"encoder_hidden_states": uncond[0], "encoder_attention_mask": uncond[1]})
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {name: p.grad for name, p in transformer.named_parameters() if p.grad is not None}
    assert grads and set(grads) <= trainable and any(g.abs().sum() > 0 for g in grads.values())

    # adapters off: the base transformer exactly (the teacher); on: the student
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = PixArtTransformer2DModel.from_pretrained(pixart, subfolder="transformer")
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([99, 599])
    student = lora_output(transformer, latents, timesteps, cond, adapted)
    with adapted.adapters_disabled(transformer):
        teacher = lora_output(transformer, latents, timesteps, cond, adapted)
    torch.testing.assert_close(teacher, lora_output(base, latents, timesteps, cond, adapted), rtol=1e-5, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-3
    torch.testing.assert_close(lora_output(transformer, latents, timesteps, cond, adapted), student)  # back on
    assert all(p.requires_grad for name, p in transformer.named_parameters() if name in trainable)

    # save / load round trip: the checkpoint hook's loader, and peft's own loader of the output folder
    adapted.save_lora_files(transformer, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == args.lora_alpha
    fresh = adapted.add_lora(PixArtTransformer2DModel.from_pretrained(pixart, subfolder="transformer"), args)
    adapted.load_lora_checkpoint(fresh, str(tmp_path))
    torch.testing.assert_close(lora_output(fresh, latents, timesteps, cond, adapted), student)
    loaded = PeftModel.from_pretrained(PixArtTransformer2DModel.from_pretrained(pixart, subfolder="transformer"),
                                       str(tmp_path))
    torch.testing.assert_close(lora_output(loaded, latents, timesteps, cond, adapted), student)


def test_the_adapted_script_trains_resumes_exactly_and_its_output_loads(adapted, pixart, assets, tmp_path):
    from diffusers import LCMScheduler

    out = tmp_path / "run"
    run_flags = flags(pixart, assets, out, "--checkpointing_steps", "1",
                      "--validation_steps", "0", "--save_precision", "fp32")
    result = run_in_process(adapted.__name__, run_flags)
    assert "LCM-LoRA (PixArt)" in result.stdout
    checkpoint = out / "checkpoint-1"
    assert json.loads((checkpoint / "training_state.json").read_text())["script"] == adapted.SCRIPT_NAME
    assert (checkpoint / adapted.LORA_WEIGHT_NAME).is_file()
    assert (checkpoint / adapted.EMA_ADAPTER_NAME).is_file()  # the default EMA adapter target, kept and saved
    assert (out / "ema_target" / adapted.LORA_WEIGHT_NAME).is_file()
    final = load_file(str(out / adapted.LORA_WEIGHT_NAME))
    assert final and all(key.startswith("base_model.model.") for key in final)
    assert any("lora_B" in key and t.abs().max() > 0 for key, t in final.items())  # B starts at zero: it trained
    assert (out / "validation" / "lora_step_000002.png").is_file()  # PixArtAlphaPipeline with the LCM scheduler
    assert "PeftModel.from_pretrained(pipe.transformer" in (out / "README.md").read_text()
    # the saved scheduler keeps only the keys LCMScheduler knows (the teacher's is DPM-Solver's)
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "LCMScheduler" and "solver_order" not in saved and "algorithm_type" not in saved
    assert LCMScheduler.from_pretrained(out / "scheduler").config.original_inference_steps == 10

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-1")
    resumed_flags = [str(resumed) if str(f) == str(out) else f for f in run_flags]
    result = run_in_process(adapted.__name__, resumed_flags + ["--resume_from_checkpoint", "latest"])
    assert "resuming from" in result.stdout
    again = load_file(str(resumed / adapted.LORA_WEIGHT_NAME))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
