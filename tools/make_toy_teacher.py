#!/usr/bin/env python
"""Train a small text-to-image Stable Diffusion teacher from scratch, offline, on the toy world.

The distillation scripts promise that a student samples in few steps what its teacher samples in many,
or draws as well with fewer blocks. A random-weight teacher cannot show that: its samples are noise.
This tool trains, on a CPU in minutes, a teacher that really follows its prompts, in the world of
``tools/toy_world.py`` (one coloured shape on a near-grey background, 32x32 pixels), and saves it with
``save_pretrained`` so every training script loads it exactly as it loads a user's teacher.

What it builds (every weight trained here, nothing downloaded):

* a word-level CLIP tokenizer (each word of the world is one token; any other text still tokenizes,
  character by character), ``model_max_length`` 8;
* a VAE (``AutoencoderKL``, 3 levels: 32x32 pixels <-> 4x8x8 latents), trained on shapes of random
  colours so it also reconstructs colours the teacher never draws; its ``scaling_factor`` gives the
  latents unit variance;
* ``--kind sd``: a CLIP text encoder and a UNet with the SD 1.x block layout (3 cross-attention down
  blocks and a plain one, 2 layers per block, a cross-attention mid block), trained together with the
  DDPM epsilon loss (min-SNR weighted) on 10% empty captions, so classifier-free guidance works;
* ``--kind sdxl``: two text encoders (the second with projection, giving the pooled embedding) and a
  UNet with the SDXL layout and ``text_time`` micro-conditioning; the empty caption's conditioning is
  zeros, as SDXL base's ``force_zeros_for_empty_prompt`` does;
* ``validation_prompts.txt``: four of its prompts (every colour and shape), which the training scripts
  validate with when no ``--validation_prompts`` are given.

At the end it samples the 12 colour-and-shape prompts with 50-step guided DDIM and checks the pictures
with the toy world's checker; a teacher below ``--min_accuracy`` is an error. The result is written to
``OUTPUT/report.json``.

Deterministic for a given machine, torch build and thread count (fixed seeds, fixed data order).
The committed teachers in ``tools/toy_teachers/`` were made with ``--threads 2`` by::

    python tools/make_toy_teacher.py --kind sd   --output_dir tools/toy_teachers/toy-sd
    python tools/make_toy_teacher.py --kind sdxl --output_dir tools/toy_teachers/toy-sdxl \
        --vae_from tools/toy_teachers/toy-sd/vae
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_world  # noqa: E402
from make_random_pipeline import (  # noqa: E402
    EOS_TOKEN,
    SD_SCHEDULE,
    _clip_text,
    _sd_unet,
    _sdxl_unet,
    _vae,
    make_offline_clip_tokenizer,
    text_encoder_config,
)

COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_teachers")
MODEL_MAX_LENGTH = 8
UNET_SD = _sd_unet((16, 32, 32, 32), cross_attention_dim=32, attention_head_dim=2, sample_size=8, norm_num_groups=8)
UNET_SDXL = _sdxl_unet((16, 32, 32), transformer_layers=(1, 1, 1), attention_head_dim=(2, 2, 2),
                       cross_attention_dim=32 + 32, addition_time_embed_dim=8, pooled_dim=32, sample_size=8,
                       norm_num_groups=8)
VAE = _vae((16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=toy_world.RESOLUTION)
TEXT = _clip_text(32, 2, 2, 64, "quick_gelu")
TEXT_2 = _clip_text(32, 2, 2, 64, "gelu", projection_dim=32)


# --------------------------------------------------------------------------------------------
# Tokenizer: one token per word of the world
# --------------------------------------------------------------------------------------------

def _bpe(word, ranks):
    """CLIP's byte-pair merge of one lower-case word: a tuple of tokens."""
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        first, second = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = tuple(merged)
    return parts


def word_merges(words):
    """BPE merges (in rank order) under which each of ``words`` is a single token."""
    ranks = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            parts = _bpe(word, ranks)
    return sorted(ranks, key=ranks.get)


def make_word_tokenizer(save_dir, pad_token=EOS_TOKEN):
    """A CLIP tokenizer whose vocabulary adds every word of the toy world (and its merges) to the
    byte-level characters of the offline tokenizer; saved to and loaded back from ``save_dir``."""
    from transformers import CLIPTokenizer

    base = make_offline_clip_tokenizer(save_dir, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)
    vocab = dict(base.get_vocab())
    merges = word_merges(toy_world.VOCABULARY)
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    for name in os.listdir(save_dir):
        os.remove(os.path.join(save_dir, name))
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": base.bos_token, "eos_token": base.eos_token, "unk_token": base.eos_token,
               "pad_token": pad_token, "model_max_length": MODEL_MAX_LENGTH}
    tokenizer = CLIPTokenizer.from_pretrained(save_dir, **special)
    tokenizer.save_pretrained(save_dir)
    tokenizer = CLIPTokenizer.from_pretrained(save_dir)
    for word in toy_world.VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"toy tokenizer splits {word!r} into {ids}")
    return tokenizer


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def to_tensor(images):
    """PIL images -> float tensor N x 3 x H x W in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def warmup_cosine(optimizer, steps, warmup_share=0.05, final_share=0.1):
    """Linear warm-up, then cosine decay to ``final_share`` of the peak learning rate."""
    warmup = max(1, int(warmup_share * steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final_share + (1 - final_share) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def vae_training_images(num_images, seed):
    """Shapes in random saturated colours (any hue), so the VAE reconstructs colours beyond the teacher's."""
    import colorsys
    import random

    rng = random.Random(seed)
    images = []
    for _ in range(num_images):
        hue, saturation, value = rng.random(), rng.uniform(0.6, 0.85), rng.uniform(0.75, 0.95)
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        images.append(toy_world.draw(rgb, rng.choice(toy_world.SHAPES), rng))
    return images


def train_vae(steps, seed, log):
    """An AutoencoderKL trained as a plain autoencoder (posterior mean plus a little noise, so the decoder
    is smooth around each code), whose posterior variance is then fixed near zero: the scripts'
    ``latent_dist.sample()`` returns the mean. A KL-weighted VAE this small stays blurry after the few
    minutes of CPU time a toy gets; this one decodes shapes sharply enough to be checked."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    pixels = torch.cat([to_tensor(vae_training_images(4096, seed)),
                        to_tensor([r["image"] for r in toy_world.sample_dataset(2048, seed + 1)])])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (32,), generator=generator)]
        mean = vae.encode(batch).latent_dist.mean
        latents = mean + 0.05 * mean.detach().std() * torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + F.l1_loss(reconstruction, batch) + 1e-4 * mean.pow(2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latent_channels = vae.config.latent_channels
        vae.quant_conv.weight[latent_channels:] = 0.0  # log-variance channels: a constant
        vae.quant_conv.bias[latent_channels:] = -12.0  # std = exp(-6) = 0.0025
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=round(float(1.0 / means.std()), 5))
    return vae


def encode_dataset(vae, records):
    """VAE posterior (mean, std) of every record's picture, in scaled latent units."""
    pixels = to_tensor([r["image"] for r in records])
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(pixels), 256):
            posterior = vae.encode(pixels[i:i + 256]).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


class SDConditioning:
    """Prompt embeddings of the SD teacher: the text encoder's last hidden state."""

    def __init__(self, tokenizers, text_encoders):
        self.tokenizer, = tokenizers
        self.text_encoder, = text_encoders

    def __call__(self, captions, time_ids=None):
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.text_encoder(ids)[0]}


class SDXLConditioning:
    """SDXL conditioning: both encoders' penultimate hidden states concatenated, the second one's
    projected pooled output, and the micro-conditioning time_ids; the empty caption gives zeros."""

    def __init__(self, tokenizers, text_encoders):
        self.tokenizers, self.text_encoders = tokenizers, text_encoders

    def __call__(self, captions, time_ids):
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0] if pooled is None else output.text_embeds
        keep = torch.tensor([bool(c) for c in captions], dtype=torch.float32)
        prompt_embeds = torch.cat(hidden, dim=-1) * keep[:, None, None]
        pooled = pooled * keep[:, None]
        return {"encoder_hidden_states": prompt_embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def min_snr_weights(alphas_cumprod, timesteps, gamma=5.0):
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=gamma) / snr


def train_denoiser(kind, unet, conditioning, trainable, latents_mean, latents_std, captions, steps, batch_size,
                   seed, log):
    """DDPM epsilon training of the UNet and text encoder(s) together; returns the EMA weights' state."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD_SCHEDULE)
    alphas_cumprod = scheduler.alphas_cumprod
    params = [p for module in trainable for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, steps)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    res = toy_world.RESOLUTION
    for step in range(steps):
        index = torch.randint(len(captions), (batch_size,), generator=generator)
        latents = latents_mean[index] + latents_std[index] * torch.randn(latents_mean[index].shape,
                                                                         generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = torch.tensor([[res, res, 0, 0, res, res]] * batch_size, dtype=torch.float32)
        cond = conditioning([captions[i] for i in index.tolist()], time_ids)
        prediction = unet(noisy, timesteps, **cond).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, timesteps)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, params):
                shadow.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"{kind} denoiser step {step}: loss {loss.item():.4f}")
    with torch.no_grad():
        for shadow, p in zip(ema, params):
            p.copy_(shadow)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------

def build_toy_teacher(kind, output_dir, *, vae_from=None, vae_steps=1200, denoiser_steps=1500, batch_size=96,
                      num_images=8000, seed=0, min_accuracy=0.6, log=print):
    """Train and save the toy teacher ``kind`` ("sd" or "sdxl") to ``output_dir``; return its report."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    start = time.perf_counter()
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir)
    tokenizers = [make_word_tokenizer(os.path.join(output_dir, "tokenizer"))]
    if kind == "sdxl":
        tokenizers.append(make_word_tokenizer(os.path.join(output_dir, "tokenizer_2"), pad_token="!"))

    if vae_from:
        vae = AutoencoderKL.from_pretrained(vae_from).eval()
    else:
        vae = train_vae(vae_steps, seed, log).eval()
    vae.requires_grad_(False)
    records = toy_world.sample_dataset(num_images, seed + 2)
    latents_mean, latents_std = encode_dataset(vae, records)

    torch.manual_seed(seed + 3)
    text_encoders = [CLIPTextModel(text_encoder_config(TEXT, tokenizers[0]))]
    if kind == "sdxl":
        text_encoders.append(CLIPTextModelWithProjection(text_encoder_config(TEXT_2, tokenizers[1])))
        unet = UNet2DConditionModel(**UNET_SDXL)
        conditioning = SDXLConditioning(tokenizers, text_encoders)
    else:
        unet = UNet2DConditionModel(**UNET_SD)
        conditioning = SDConditioning(tokenizers, text_encoders)
    train_denoiser(kind, unet, conditioning, [unet, *text_encoders], latents_mean, latents_std,
                   [r["text"] for r in records], denoiser_steps, batch_size, seed + 4, log)

    scheduler = DDIMScheduler.from_config(SD_SCHEDULE)
    components = {"unet": unet.eval(), "vae": vae, "text_encoder": text_encoders[0].eval(),
                  "tokenizer": tokenizers[0], "scheduler": scheduler}
    if kind == "sdxl":
        components.update(text_encoder_2=text_encoders[1].eval(), tokenizer_2=tokenizers[1])
        pipeline = StableDiffusionXLPipeline(**components, add_watermarker=False, force_zeros_for_empty_prompt=True)
    else:
        pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(output_dir)
    write_validation_prompts(output_dir)

    report = {"kind": kind, "build_seconds": round(time.perf_counter() - start, 1), "seed": seed,
              "vae_steps": 0 if vae_from else vae_steps, "denoiser_steps": denoiser_steps,
              "batch_size": batch_size, "threads": torch.get_num_threads(),
              "unet_parameters": sum(p.numel() for p in unet.parameters())}
    return write_report(output_dir, report, min_accuracy, log)


def write_validation_prompts(output_dir):
    """validation_prompts.txt: the training scripts validate with these when no --validation_prompts are given, in
    place of their general default prompts, which this teacher's word-level, 8-token tokenizer cannot read."""
    with open(os.path.join(output_dir, "validation_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{prompt}\n" for prompt in toy_world.validation_prompts()))


def write_report(output_dir, report, min_accuracy=0.0, log=print):
    """Measure the saved teacher (prompt accuracy of guided DDIM samples, VAE round trips) into
    ``OUTPUT/report.json``; a teacher below ``min_accuracy`` at 50 steps is an error."""
    import toy_metrics

    pipeline = toy_metrics.load_pipeline(output_dir)
    report = dict(report, accuracy={})
    for guidance in (1.0, 2.0, 3.0, 4.0, 6.0):
        for steps in (1, 2, 4, 50) if guidance == toy_metrics.TEACHER_GUIDANCE else (50,):
            result = toy_metrics.evaluate(pipeline, "ddim", steps, guidance)
            report["accuracy"][f"ddim{steps}_cfg{guidance:g}"] = round(result["accuracy"], 3)
    report["reconstruction_accuracy"] = round(toy_metrics.reconstruction_accuracy(pipeline.vae), 3)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(json.dumps(report, indent=2))
    accuracy = report["accuracy"][f"ddim50_cfg{toy_metrics.TEACHER_GUIDANCE:g}"]
    if accuracy < min_accuracy:
        raise RuntimeError(f"the toy teacher follows its prompts in {accuracy:.0%} of 50-step samples, "
                           f"below --min_accuracy {min_accuracy:.0%}")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("sd", "sdxl"), default="sd")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vae_from", default=None, help="reuse a trained toy VAE folder instead of training one")
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--denoiser_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--min_accuracy", type=float, default=0.6)
    parser.add_argument("--report_only", action="store_true",
                        help="only re-measure an existing teacher in --output_dir (rewrites report.json)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        with open(os.path.join(args.output_dir, "report.json")) as f:
            write_report(args.output_dir, json.load(f), args.min_accuracy)
        return 0
    build_toy_teacher(args.kind, args.output_dir, vae_from=args.vae_from, vae_steps=args.vae_steps,
                      denoiser_steps=args.denoiser_steps, batch_size=args.batch_size, seed=args.seed,
                      min_accuracy=args.min_accuracy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
