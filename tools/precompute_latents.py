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

Usage::

    python tools/precompute_latents.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_shards_path_or_url "data/{00000..00099}.tar" --output_dir data-latents \\
        --resolution 512 --center_crop --random_flip [--text_embeddings] [--latent_dtype float16]
"""

import io
import json
import os
import random
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the training scripts are importable modules: their preprocessing is THE preprocessing
sys.path.insert(1, os.path.join(REPO, "tools"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import train_lcm_distill_sd_wds as source  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_NAME = "latents-{:06d}.tar"


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
    if os.path.isdir(args.output_dir) and any(n.startswith("latents-") and n.endswith(".tar")
                                              for n in os.listdir(args.output_dir)):
        parser.error(f"--output_dir {args.output_dir} already holds latents-*.tar shards: choose another or "
                     "delete them")
    return args


def load_encoders(args):
    """The VAE and, with --text_embeddings, the caption encoder: (vae, vae name, encode(captions) or None,
    [(name, text encoder)])."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype, model = TORCH_DTYPES[args.dtype], args.pretrained_model
    try:
        if args.pretrained_vae_model_name_or_path is not None:
            vae_name = args.pretrained_vae_model_name_or_path
            vae = AutoencoderKL.from_pretrained(vae_name, torch_dtype=dtype)
        else:
            vae_name = f"{model}/vae"
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        text_encoders, tokenizers = [], []
        if args.text_embeddings:
            sdxl = "text_encoder_2" in DiffusionPipeline.load_config(model)
            kinds = [("text_encoder", "tokenizer", CLIPTextModel)]
            if sdxl:
                kinds.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
            tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=t) for _, t, _ in kinds]
            text_encoders = [(f"{model}/{e}", cls.from_pretrained(model, subfolder=e, torch_dtype=dtype))
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


class ShardWriter:
    """latents-NNNNNN.tar files of `samples_per_shard` samples each, written under a temporary name and renamed
    when complete (a crash leaves no truncated shard under a real name); fixed tar metadata."""

    def __init__(self, output_dir, samples_per_shard):
        self.output_dir, self.samples_per_shard = output_dir, samples_per_shard
        self.tar, self.in_shard, self.shards, self.keys_in_shard = None, 0, 0, set()
        os.makedirs(output_dir, exist_ok=True)

    def write(self, key, members):
        if key in self.keys_in_shard:  # webdataset would merge two samples of one key in one tar: start another
            self.close()
        if self.tar is None:
            self.path = os.path.join(self.output_dir, SHARD_NAME.format(self.shards))
            self.tar = tarfile.open(self.path + ".tmp", "w")
        self.keys_in_shard.add(key)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.in_shard += 1
        if self.in_shard == self.samples_per_shard:
            self.close()

    def close(self):
        if self.tar is not None:
            self.tar.close()
            os.replace(self.path + ".tmp", self.path)
            self.tar, self.in_shard, self.shards, self.keys_in_shard = None, 0, self.shards + 1, set()


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
    transform = source.ImageTransform(args.resolution, args.interpolation_type, args.center_crop)
    counts = source.new_data_counts()
    stream, samples = raw_samples(args, counts)
    writer = ShardWriter(args.output_dir, args.samples_per_shard)
    progress = tqdm(desc="precomputing", unit="sample")
    written, uncaptioned, batch = 0, 0, []

    def flush():
        for item, arrays in zip(batch, encode_batch(args, vae, encode, batch)):
            writer.write(item["key"], {**arrays, "txt": item["caption"].encode("utf-8"), "json": item["json"],
                                       source.PRECOMPUTED_RECORD: json.dumps(item["record"]).encode("utf-8")})
        progress.update(len(batch))
        batch.clear()

    try:
        for key, sample in samples:
            read = stream._read(sample, counts)
            if read is None:
                progress.set_postfix(skipped=sum(counts.values()))
                continue
            caption, _, image = read
            if isinstance(image, dict):
                raise SystemExit(f"error: {key} in {sample.get('__url__')} already holds precomputed latents")
            pixels, image_size, crop_top_left = transform(image, random.Random(f"{args.seed}-{key}"))
            meta = sample.get("json", b"{}")
            try:
                original_size = source.original_size_from_metadata(json.loads(meta)) or image_size
            except (ValueError, TypeError, AttributeError):  # malformed json: the scripts judge it themselves
                original_size = image_size
            uncaptioned += not caption
            batch.append({"key": key, "pixels": pixels, "caption": caption, "json": meta, "record": {
                **making, "original_size": list(original_size), "image_size": list(image_size),
                "crop_top_left": list(crop_top_left)}})
            written += 1
            if len(batch) == args.batch_size:
                flush()
        if batch:
            flush()
    finally:
        writer.close()
        progress.close()
    skipped = (f"skipped {counts['n_corrupt']} unreadable, {counts['n_filtered']} filtered, "
               f"{counts['n_malformed']} with malformed metadata"
               + (f", {counts['n_stalled']} stalled shard(s)" if counts["n_stalled"] else "")
)
    if not written:
        raise SystemExit(f"error: no usable sample ({skipped})")
    print(f"wrote {written} samples in {writer.shards} shard(s) to {args.output_dir}; {skipped}"
          + (f"; {uncaptioned} without a caption" if uncaptioned else ""))


if __name__ == "__main__":
    main()
