#!/usr/bin/env python
"""Encode a data set with the VAE once, for the shard-fed training scripts, instead of at every use.

BK-SDM's recipe passes over its data ~60 times and a VAE encode at 512 px costs about a UNet forward; the
frozen VAE gives the same posterior every time, so it is computed here once and written as new WebDataset
shards that `train_lcm_distill_sd_wds.py`, `train_lcm_distill_lora_sd_wds.py`, `train_lcm_distill_sdxl_wds.py`
and `train_bk_sdm_kd.py` read through `--train_shards_path_or_url` like any other shards.

Each output sample (KEY = the source sample's key) holds:

    KEY.latent_mean.npy, KEY.latent_std.npy   the VAE posterior's mean and std (unscaled, before the VAE's
                                              scaling_factor), shape (V, 4, h, w): view 0 the crop, view 1 its
                                              mirror image (with --random_flip)
    KEY.txt                                   the caption as the scripts read it (.txt, else json caption/text)
    KEY.json                                  the source json ({} when there was none): the scripts' filters
    KEY.prompt_embeds.npy                     with --text_embeddings: the caption's embeddings as the script
    KEY.pooled_prompt_embeds.npy              computes them (SDXL: both encoders, and the pooled one)
    KEY.latents.json                          how it was made: format, VAE (name, weight fingerprint),
                                              resolution, crop, interpolation, views, dtypes, text encoders;
                                              and the sample's original size, image size and crop

The scripts sample z = (mean + std * noise) * scaling_factor at each use, as an encoding VAE does, choose the
mirror view with the same random draw they use to flip an image, and refuse at start-up shards made with
another VAE, resolution, crop mode, interpolation or text encoder than the run's, or without mirror images
for a --random_flip run. Preprocessing is the scripts' own (imported from them, not repeated here).

A random crop (no --center_crop) is drawn ONCE here, from --seed and the sample's key: every epoch of the
training run then sees the same crop of an image (a raw-image run draws a new one each time).

A shard is written under a temporary name and renamed when complete; latents-progress.json records, after each
one, where in the input it ends. A run stopped (Ctrl-C, a full disk, a crash) keeps its complete shards, and the
same command run again continues where they end: the shards are those of one uninterrupted run (byte for byte
with the same --batch_size and device). A rerun with other settings is refused.

Usage::

    python tools/precompute_latents.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_shards_path_or_url "data/{00000..00099}.tar" --output_dir data-latents \\
        --resolution 512 --center_crop --random_flip [--text_embeddings] [--latent_dtype float16]
"""

import contextlib
import errno
import io
import json
import os
import random
import re
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the training scripts are importable modules: their preprocessing is THE preprocessing
sys.path.insert(1, os.path.join(REPO, "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import train_lcm_distill_sd_wds as source  # noqa: E402

from make_wds_shards import plural  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_NAME = "latents-{:06d}.tar"
PROGRESS_NAME = "latents-progress.json"  # how far a run got: what a rerun into the same directory continues from
# the flags that decide what is written (not where, nor how fast): a rerun must repeat them to continue a run
OUTPUT_FLAGS = ("pretrained_model", "pretrained_vae_model_name_or_path", "text_embeddings", "dtype",
                "train_shards_path_or_url", "train_data_dir", "image_column", "caption_column", "resolution",
                "center_crop", "random_flip", "interpolation_type", "min_image_size", "max_watermark_probability",
                "min_aesthetic_score", "seed", "samples_per_shard", "latent_dtype")


def parse_args(argv=None):
    parser = source.OneLineErrorParser(
        prog="precompute_latents.py",
        description="Write WebDataset shards holding each image's VAE posterior (and caption embeddings), made "
                    "with the training scripts' own preprocessing. A random crop (no --center_crop) is drawn once, "
                    "here, from --seed and the sample's key: training then sees the same crop of an image in every "
                    "epoch. --random_flip stores the mirror image's latents too; the training run picks one per use.")
    group = parser.add_argument_group("models")
    group.add_argument("--pretrained_model_name_or_path", "--pretrained_teacher_model", dest="pretrained_model",
                       type=str, default=None,
                       help="Teacher pipeline (local folder or hub id): its vae/, and its text encoder(s) for "
                            "--text_embeddings (SDXL when it has text_encoder_2).")
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="A VAE to use instead of the pipeline's (as the scripts' flag of the same name).")
    group.add_argument("--text_embeddings", action="store_true",
                       help="Also store the captions' embeddings by the frozen text encoder(s).")
    group.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="Where to run the encoders (default: cuda when available).")
    group.add_argument("--dtype", choices=list(TORCH_DTYPES), default="float32",
                       help="Dtype of the VAE and text encoders here. float32 (default): computed once, so at "
                            "full precision; the SDXL VAE overflows in float16.")
    group.add_argument("--batch_size", type=source.bounded(int, 1, None), default=16, help="Images per VAE call.")
    group = parser.add_argument_group("data (as the training scripts read it)")
    group.add_argument("--train_shards_path_or_url", type=str, default=None,
                       help="WebDataset shards: a path or brace pattern, a URL, a 'pipe:' command, or several joined "
                            "by '::'.")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="An image folder with metadata.jsonl or metadata.csv (as train_bk_sdm_kd.py reads it).")
    group.add_argument("--image_column", type=str, default="file_name", help="--train_data_dir: image path column.")
    group.add_argument("--caption_column", type=str, default="text", help="--train_data_dir: caption column.")
    group.add_argument("--resolution", type=source.bounded(int, 8, None), default=512,
                       help="Training resolution (square), divisible by 8.")
    group.add_argument("--center_crop", action="store_true",
                       help="Crop the centre (else a random square, drawn once here from --seed).")
    group.add_argument("--random_flip", action="store_true",
                       help="Also store the latents of each crop's mirror image (view 1).")
    group.add_argument("--interpolation_type", type=str, default="bilinear", choices=list(source.ImageTransform.FILTERS),
                       help="Resampling filter used to resize the shorter side to --resolution.")
    group.add_argument("--min_image_size", type=source.bounded(int, 0, None), default=0,
                       help="Drop samples whose shorter side is below this (from the json, else the decoded image).")
    group.add_argument("--max_watermark_probability", type=source.bounded(float, 0, 1), default=None,
                       help="Drop samples whose json 'pwatermark' is above this.")
    group.add_argument("--min_aesthetic_score", type=source.bounded(float), default=None,
                       help="Drop samples whose json 'aesthetic' score is below this.")
    group.add_argument("--seed", type=int, default=0, help="Seed of the random crops.")
    group.add_argument("--shard_read_timeout", type=source.bounded(float, 0, None, low_open=True), default=600.0,
                       help="Seconds a 'pipe:' or http(s) shard may send no data before it is abandoned.")
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", type=str, required=True, help="Where to write latents-NNNNNN.tar.")
    group.add_argument("--samples_per_shard", type=source.bounded(int, 1, None), default=1000,
                       help="Samples per output shard.")
    group.add_argument("--latent_dtype", choices=["float16", "float32"], default="float16",
                       help="Dtype of the stored arrays (float16 halves the disk).")
    args = parser.parse_args(argv)

    if args.resolution % 8:
        parser.error(f"--resolution {args.resolution} is not divisible by 8")
    if (args.train_shards_path_or_url is None) == (args.train_data_dir is None):
        parser.error("give exactly one data source: --train_shards_path_or_url or --train_data_dir")
    if args.train_shards_path_or_url is not None:
        urls = source.expand_shard_urls(args.train_shards_path_or_url)
        missing = [u for u in urls if not source.is_remote_url(u) and not os.path.isfile(os.path.expanduser(u))]
        if not urls or missing:
            parser.error(f"--train_shards_path_or_url: shard not found: {missing[0] if missing else '(none named)'}")
    elif not os.path.isdir(args.train_data_dir):
        parser.error(f"--train_data_dir: no such directory: {args.train_data_dir}")
    if args.pretrained_model is None and (args.text_embeddings or args.pretrained_vae_model_name_or_path is None):
        parser.error("--pretrained_model_name_or_path is required (for its VAE, or its text encoders with "
                     "--text_embeddings)")
    progress = read_progress(args.output_dir)
    if progress is None and shard_names(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} already holds latents-*.tar shards but no {PROGRESS_NAME} to "
                     "continue from: choose another or delete them")
    if progress is not None:
        ours, theirs = output_settings(args), progress["settings"]
        changed = [f"{flag_name(dest)} {theirs.get(dest)} there, {ours.get(dest)} here"
                   for dest in OUTPUT_FLAGS if ours.get(dest) != theirs.get(dest)]
        if changed:
            parser.error(f"--output_dir {args.output_dir} holds shards of a run with other settings "
                         f"({'; '.join(changed)}): repeat its flags to continue it, or choose another directory")
    return args


def flag_name(dest):
    return "--pretrained_model_name_or_path" if dest == "pretrained_model" else f"--{dest}"


def output_settings(args):
    """The flags that decide what is written, as latents-progress.json records them."""
    settings = {dest: getattr(args, dest) for dest in OUTPUT_FLAGS}
    if args.train_data_dir is not None:
        settings["train_data_dir"] = os.path.abspath(args.train_data_dir)
    return settings


def shard_names(output_dir):
    """The latents-NNNNNN.tar files in `output_dir`, sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if re.fullmatch(r"latents-\d{6,}\.tar", name))


def read_progress(output_dir):
    """The progress record of the run that wrote `output_dir`, or None when there is none."""
    path = os.path.join(output_dir, PROGRESS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
        if not all(key in progress for key in ("settings", "making", "shards", "next_input", "counts")):
            raise ValueError("fields missing")
    except (ValueError, TypeError):
        raise SystemExit(f"error: {path} is unreadable: delete the directory's latents-* files to start "
                         "over") from None
    return progress


def shard_pattern(output_dir, count):
    """What to pass as --train_shards_path_or_url to read the `count` shards written to `output_dir`."""
    return os.path.join(output_dir, f"latents-{{000000..{count - 1:06d}}}.tar")


def load_encoders(args):
    """The VAE and, with --text_embeddings, the caption encoder: (vae, vae name, encode(captions) or None,
    [(name, text encoder)])."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype, model = TORCH_DTYPES[args.dtype], args.pretrained_model
    try:
        if args.pretrained_vae_model_name_or_path is not None:
            vae_name = args.pretrained_vae_model_name_or_path
            vae = AutoencoderKL.from_pretrained(vae_name, dtype=dtype)
        else:
            vae_name = f"{model}/vae"
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype)
        text_encoders, tokenizers = [], []
        if args.text_embeddings:
            sdxl = "text_encoder_2" in DiffusionPipeline.load_config(model)
            kinds = [("text_encoder", "tokenizer", CLIPTextModel)]
            if sdxl:
                kinds.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
            tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=t) for _, t, _ in kinds]
            text_encoders = [(f"{model}/{e}", cls.from_pretrained(model, subfolder=e, dtype=dtype))
                             for e, _, cls in kinds]
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the encoders: {str(error).strip().splitlines()[0]}") from None
    vae.requires_grad_(False).eval().to(args.device)
    encoders = [encoder.requires_grad_(False).eval().to(args.device) for _, encoder in text_encoders]

    def encode(captions):  # exactly the scripts' encoding: SD's encode_prompts, SDXL's encode_prompts_sdxl
        if len(encoders) == 2:
            import train_lcm_distill_sdxl_wds as sdxl_script

            return sdxl_script.encode_prompts_sdxl(encoders, tokenizers, captions)
        return source.encode_prompts(encoders[0], tokenizers[0], captions)

    return vae, vae_name, encode if encoders else None, text_encoders


def raw_samples(args, counts):
    """(output key, raw sample) of the input, in its order, read as the training scripts read it; and the stream
    whose `_read` applies their caption rules, filters and image decoding."""
    options = dict(batch_size=1, transform=None, shuffle_buffer_size=0, shard_read_timeout=args.shard_read_timeout,
                   sample_filter=source.SampleFilter(args.min_image_size, args.max_watermark_probability,
                                                     args.min_aesthetic_score))
    if args.train_data_dir is not None:
        import train_bk_sdm_kd as bk
        from make_wds_shards import sample_key

        try:
            entries = bk.read_image_folder(args.train_data_dir, args.image_column, args.caption_column)
        except bk.DataError as error:
            raise SystemExit(f"error: {error}") from None
        stream = bk.ImageFolderStream(entries, **options)
        folder = os.path.abspath(args.train_data_dir)
        samples = ((sample_key(os.path.relpath(s["__key__"], folder)), s)
                   for s in stream._raw_samples([path for path, _, _ in entries], counts))
    else:
        stream = source.ShardStream(source.expand_shard_urls(args.train_shards_path_or_url), **options)
        samples = ((s["__key__"], s) for s in stream._raw_samples(stream.urls, counts))
    return stream, samples


class WriteFailed(Exception):
    """Writing the output failed (a full disk, a lost mount): the run stops with one line."""

    def __init__(self, path, error):
        super().__init__(path, error)
        self.path, self.error = path, error


class ShardWriter:
    """latents-NNNNNN.tar files, each written under a temporary name (fixed tar metadata) and renamed when
    complete, after which latents-progress.json records it and where the input continues: a partial shard never
    gets a final name, and a rerun continues after the last complete one."""

    def __init__(self, output_dir, progress):
        self.output_dir, self.progress = output_dir, progress
        self.tar, self.path = None, None
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as error:
            raise WriteFailed(output_dir, error) from None

    @property
    def shards(self):
        return len(self.progress["shards"])

    def write(self, key, members):
        try:
            if self.tar is None:
                self.path = os.path.join(self.output_dir, SHARD_NAME.format(self.shards))
                self.tar = tarfile.open(self.path + ".tmp", "w")
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                self.tar.addfile(info, io.BytesIO(data))
        except OSError as error:
            raise WriteFailed(self.path + ".tmp", error) from None

    def finish_shard(self, samples, state):
        """Close the shard of `samples` samples and record it with `state`: where the input continues after it."""
        try:
            self.tar.close()
            self.tar = None
            os.replace(self.path + ".tmp", self.path)
        except OSError as error:
            raise WriteFailed(self.path + ".tmp", error) from None
        shard = {"name": os.path.basename(self.path), "samples": samples, "bytes": os.path.getsize(self.path)}
        self.record(shards=[*self.progress["shards"], shard], **state)

    def record(self, complete=False, **state):
        """Update the progress, in memory once it is on disk (a shard not recorded is not kept)."""
        updated = {**self.progress, **state, "complete": complete}
        path = os.path.join(self.output_dir, PROGRESS_NAME)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(updated, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            raise WriteFailed(path, error) from None
        self.progress.update(updated)

    def abandon(self):
        """Delete the shard being written: it is incomplete, and its space may be what the disk lacks."""
        if self.tar is not None:
            with contextlib.suppress(OSError):
                self.tar.fileobj.close()
            self.tar = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path + ".tmp")


def continue_from(args):
    """The progress of the earlier run into --output_dir (a fresh record when none): its complete shards are
    checked and kept, and what it left unfinished (a temporary shard, a shard renamed but not yet recorded)
    removed, to be written again."""
    progress = read_progress(args.output_dir)
    if progress is None:
        return {"settings": output_settings(args), "making": None, "shards": [], "next_input": 0, "written": 0,
                "uncaptioned": 0, "counts": {}, "complete": False}
    recorded = {shard["name"]: shard for shard in progress["shards"]}
    for name, shard in recorded.items():
        path = os.path.join(args.output_dir, name)
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            raise SystemExit(f"error: {path}, recorded complete in {PROGRESS_NAME}, is missing or changed: delete "
                             "the directory's latents-* files to start over")
    unfinished = [name for name in shard_names(args.output_dir) if name not in recorded]
    unfinished += [name for name in os.listdir(args.output_dir) if re.fullmatch(r"latents-\d{6,}\.tar\.tmp", name)]
    for name in unfinished:
        os.remove(os.path.join(args.output_dir, name))
    return progress


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@torch.no_grad()
def encode_batch(args, vae, encode, batch):
    """The stored arrays of a batch of prepared samples: posterior mean/std per view, and caption embeddings."""
    pixels = torch.stack([item["pixels"] for item in batch]).to(args.device, dtype=vae.dtype)
    views = [pixels, torch.flip(pixels, dims=[-1])] if args.random_flip else [pixels]
    # the scripts' flip (PIL FLIP_LEFT_RIGHT after the crop) and this flip of the tensor give the same pixels
    dists = [vae.encode(view).latent_dist for view in views]
    dtype = np.dtype(args.latent_dtype)
    arrays = {"latent_mean": torch.stack([d.mean for d in dists], dim=1),
              "latent_std": torch.stack([d.std for d in dists], dim=1)}
    if encode is not None:
        embeds = encode([item["caption"] for item in batch])
        arrays.update(zip(source.PRECOMPUTED_TEXT_ARRAYS, embeds if isinstance(embeds, tuple) else (embeds,)))
    return [{f"{name}.npy": npy_bytes(array[i].float().cpu().numpy().astype(dtype)) for name, array in arrays.items()}
            for i in range(len(batch))]


def main(argv=None):
    args = parse_args(argv)
    progress = continue_from(args)
    if progress["complete"]:
        shards = len(progress["shards"])
        print(f"nothing to do: {args.output_dir} holds the complete output of this command, "
              f"{plural(progress['written'], 'sample')} in {plural(shards, 'shard')}: "
              f"{shard_pattern(args.output_dir, shards)}")
        return
    vae, vae_name, encode, text_encoders = load_encoders(args)
    making = {
        "format_version": source.PRECOMPUTED_FORMAT_VERSION,
        "made_by": "tools/precompute_latents.py",
        "vae": {"name": vae_name, "fingerprint": source.vae_fingerprint(vae), "dtype": args.dtype},
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "crop_seed": None if args.center_crop else args.seed,
        "interpolation": args.interpolation_type,
        "views": 2 if args.random_flip else 1,
        "latent_dtype": args.latent_dtype,
        "text_encoders": [{"name": name, "fingerprint": source.weights_fingerprint(encoder.named_parameters())}
                          for name, encoder in text_encoders] or None,
        "text_embeddings": {0: None, 1: "sd", 2: "sdxl"}[len(text_encoders)],
    }
    if progress["making"] not in (None, making):
        raise SystemExit(f"error: the models named are not those the shards in {args.output_dir} were made with "
                         "(other weights at the same path?): choose another directory")
    progress["making"] = making
    resume_from = progress["next_input"]
    if resume_from:
        print(f"continuing {args.output_dir} after its {plural(len(progress['shards']), 'complete shard')} "
              f"({plural(progress['written'], 'sample')}), from input sample {resume_from}")
    transform = source.ImageTransform(args.resolution, args.interpolation_type, args.center_crop)
    counts = source.new_data_counts()
    stream, samples = raw_samples(args, counts)
    writer = None
    bar = tqdm(desc="precomputing", unit="sample", initial=progress["written"])
    written, uncaptioned, consumed = progress["written"], progress["uncaptioned"], resume_from
    batch, shard_keys, last = [], set(), None  # the samples to encode next, the keys of this shard, the last sample

    def flush(end_shard=False):
        for item, arrays in zip(batch, encode_batch(args, vae, encode, batch) if batch else []):
            writer.write(item["key"], {**arrays, "txt": item["caption"].encode("utf-8"), "json": item["json"],
                                       source.PRECOMPUTED_RECORD: json.dumps(item["record"]).encode("utf-8")})
        bar.update(len(batch))
        batch.clear()
        if end_shard and shard_keys:
            # a rerun continues after the last sample of this shard, with the totals as they were there
            writer.finish_shard(len(shard_keys), {key: last[key] for key in ("next_input", "written", "uncaptioned",
                                                                             "counts")})
            shard_keys.clear()

    def kept(advice="rerun"):
        shards = len(progress["shards"])
        if not shards:
            return f"no complete shard yet: {advice} the same command to start again"
        return (f"kept {plural(shards, 'complete shard')} ({plural(progress['written'], 'sample')}, "
                f"{shard_pattern(args.output_dir, shards)}): {advice} the same command to continue after them")

    try:
        writer = ShardWriter(args.output_dir, progress)
        for index, (key, sample) in enumerate(samples):
            consumed = max(consumed, index + 1)
            if index < resume_from:  # written by the run this one continues
                if index == resume_from - 1:
                    counts.update(progress["counts"])  # the skips that run had counted by here
                continue
            read = stream._read(sample, counts)
            if read is None:
                bar.set_postfix(skipped=counts["n_corrupt"] + counts["n_filtered"] + counts["n_malformed"])
                continue
            caption, _, image = read
            if isinstance(image, dict):
                raise SystemExit(f"error: {key} in {sample.get('__url__')} already holds precomputed latents")
            # a shard ends at --samples_per_shard samples, or before a key it holds already (webdataset would merge
            # the two samples); a batch never spans two shards, so a rerun encodes the same batches
            if key in shard_keys:
                flush(end_shard=True)
            pixels, image_size, crop_top_left = transform(image, random.Random(f"{args.seed}-{key}"))
            meta = sample.get("json", b"{}")
            try:
                original_size = source.original_size_from_metadata(json.loads(meta)) or image_size
            except (ValueError, TypeError, AttributeError):  # malformed json: the scripts judge it themselves
                original_size = image_size
            written += 1
            uncaptioned += not caption
            last = {"key": key, "pixels": pixels, "caption": caption, "json": meta, "record": {
                **making, "original_size": list(original_size), "image_size": list(image_size),
                "crop_top_left": list(crop_top_left)},
                "next_input": index + 1, "written": written, "uncaptioned": uncaptioned, "counts": dict(counts)}
            batch.append(last)
            shard_keys.add(key)
            if len(shard_keys) == args.samples_per_shard:
                flush(end_shard=True)
            elif len(batch) == args.batch_size:
                flush()
        flush(end_shard=True)
        if written:
            writer.record(complete=True, next_input=consumed, written=written, uncaptioned=uncaptioned,
                          counts=dict(counts))
    except KeyboardInterrupt:
        bar.close()  # before the message, which is then the last line
        if writer is not None:
            writer.abandon()
        print(f"interrupted: {kept()}", file=sys.stderr)
        raise SystemExit(130) from None
    except WriteFailed as failure:
        bar.close()
        if writer is not None:
            writer.abandon()
        if failure.error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            reason, advice = "disk full", "free some space, then rerun"
        else:
            reason, advice = failure.error.strerror or str(failure.error), "rerun"
        raise SystemExit(f"error: cannot write {failure.path} ({reason}); {kept(advice)}") from None
    finally:
        bar.close()
    skipped = (f"skipped {counts['n_corrupt']} unreadable, {counts['n_filtered']} filtered, "
               f"{counts['n_malformed']} with malformed metadata"
               + (f", {plural(counts['n_stalled'], 'stalled shard')}" if counts["n_stalled"] else ""))
    notes = [f"{uncaptioned} without a caption"] if uncaptioned else []
    if counts.get("n_not_utf8"):
        notes.append(f"{counts['n_not_utf8']} with a caption or json not in UTF-8 (read as Windows-1252)")
    if not written:
        raise SystemExit(f"error: no usable sample ({skipped})")
    print(f"wrote {plural(written, 'sample')} in {plural(writer.shards, 'shard')}: "
          f"{shard_pattern(args.output_dir, writer.shards)}")
    print("; ".join([skipped, *notes]))


if __name__ == "__main__":
    main()
