#!/usr/bin/env python
"""Write a small synthetic text-to-image dataset: coloured shapes with matching captions.

Tests and smoke runs need an image-caption dataset without any download. Each image is one
circle, square or triangle of a named colour on a plain background of another colour, and the
caption says exactly that ("a red circle on a blue background"), so a model trained on it has
something learnable. Sizes vary per image (width != height occurs) so aspect-ratio handling,
resizing and cropping code gets exercised.

Captions are stored in one of the layouts the training scripts read:

* ``txt``:   a sidecar ``00000.txt`` next to each ``00000.png``;
* ``jsonl``: ``metadata.jsonl``, one ``{"file_name": ..., "text": ..., ...}`` object per line
  (the Hugging Face imagefolder convention);
* ``csv``:   ``metadata.csv`` with a ``file_name,text,...`` header.

The jsonl/csv tables also carry LAION-style per-image metadata (``aesthetic`` score and
``pwatermark`` probability) unless ``--no_extra_metadata``; they are random numbers, there to test
that metadata travels into shards and filters.

Everything is a function of ``--seed``: the same seed gives the same images and captions,
whatever caption layout is chosen.

Usage::

    python tools/make_toy_dataset.py --output_dir DIR [--num_images 8] [--seed 0]
        [--captions txt|jsonl|csv] [--min_side 96 --max_side 128] [--format png|jpg|webp]
"""

import argparse
import csv
import json
import os
import random
import sys

from PIL import Image, ImageDraw

# Named colours, far enough apart that the caption stays true after JPEG compression.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (245, 150, 190),
    "cyan": (40, 200, 220),
    "brown": (120, 75, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
CAPTION_MODES = ("txt", "jsonl", "csv")
# extension -> (PIL format name, save options)
FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 90})}


def draw_shape(shape, color, background, width, height, rng):
    """Return an RGB ``width`` x ``height`` image with one ``shape`` fully inside the frame.

    The shape's size is 30-70% of the shorter side and its position is random, so the object is
    not always centred (random crops can cut it, as with real data).
    """
    image = Image.new("RGB", (width, height), COLORS[background])
    draw = ImageDraw.Draw(image)
    size = rng.randint(int(0.3 * min(width, height)), int(0.7 * min(width, height)))
    left = rng.randint(0, width - size)
    top = rng.randint(0, height - size)
    box = (left, top, left + size - 1, top + size - 1)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "triangle":
        draw.polygon([(left + size // 2, top), (left, top + size - 1), (left + size - 1, top + size - 1)],
                     fill=COLORS[color])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def make_toy_dataset(output_dir, num_images=8, seed=0, captions="txt", min_side=96, max_side=128,
                     image_format="png", extra_metadata=True, overwrite=False):
    """Write ``num_images`` shape images with captions to ``output_dir``; return their records.

    Each record is a dict ``{"file_name", "text", "width", "height", "shape", "color",
    "background", "aesthetic", "pwatermark"}`` (file_name relative to ``output_dir``).
    ``captions`` picks the caption layout (txt / jsonl / csv, see the module docstring);
    ``extra_metadata`` adds the aesthetic/pwatermark columns to the jsonl/csv table.
    Refuses a non-empty ``output_dir`` unless ``overwrite``, so that files of an earlier run in
    another layout cannot mix with this one.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {tuple(FORMATS)}, got {image_format!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir!r} is not empty (pass overwrite=True / --overwrite)")
    os.makedirs(output_dir, exist_ok=True)

    rng = random.Random(seed)
    pil_format, save_options = FORMATS[image_format]
    records = []
    for i in range(num_images):
        # Draw every random number in the same order whatever the options, so the images for a
        # seed do not depend on the caption layout or on extra_metadata.
        width = rng.randint(min_side, max_side)
        height = rng.randint(min_side, max_side)
        if i == 0 and width == height and min_side < max_side:
            # Guarantee at least one non-square image: aspect-ratio code must see one.
            height = min_side if width != min_side else max_side
        shape = rng.choice(SHAPES)
        color, background = rng.sample(sorted(COLORS), 2)
        image = draw_shape(shape, color, background, width, height, rng)
        record = {
            "file_name": f"{i:05d}.{image_format}",
            "text": f"a {color} {shape} on a {background} background",
            "width": width,
            "height": height,
            "shape": shape,
            "color": color,
            "background": background,
            "aesthetic": round(rng.uniform(4.0, 7.5), 3),
            "pwatermark": round(rng.uniform(0.0, 1.0), 3),
        }
        image.save(os.path.join(output_dir, record["file_name"]), format=pil_format, **save_options)
        if captions == "txt":
            with open(os.path.join(output_dir, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(record["text"] + "\n")
        records.append(record)

    columns = ["file_name", "text"] + (["aesthetic", "pwatermark"] if extra_metadata else [])
    if captions == "jsonl":
        with open(os.path.join(output_dir, "metadata.jsonl"), "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps({c: record[c] for c in columns}) + "\n")
    elif captions == "csv":
        with open(os.path.join(output_dir, "metadata.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic coloured-shapes image/caption dataset.")
    parser.add_argument("--output_dir", required=True, help="directory to write the images and captions to")
    parser.add_argument("--num_images", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="same seed -> same dataset (default 0)")
    parser.add_argument("--captions", default="txt", choices=CAPTION_MODES,
                        help="caption storage: txt sidecars, metadata.jsonl or metadata.csv (default txt)")
    parser.add_argument("--min_side", type=int, default=96, help="smallest image side in pixels (default 96)")
    parser.add_argument("--max_side", type=int, default=128, help="largest image side in pixels (default 128)")
    parser.add_argument("--format", dest="image_format", default="png", choices=list(FORMATS),
                        help="image file format (default png)")
    parser.add_argument("--no_extra_metadata", dest="extra_metadata", action="store_false",
                        help="leave the aesthetic/pwatermark columns out of metadata.jsonl/.csv")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    if not 8 <= args.min_side <= args.max_side:
        parser.error(f"need 8 <= --min_side <= --max_side, got {args.min_side} and {args.max_side}")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} is not empty; pass --overwrite to write into it anyway")
    return args


def main(argv=None):
    args = parse_args(argv)
    records = make_toy_dataset(
        args.output_dir, num_images=args.num_images, seed=args.seed, captions=args.captions,
        min_side=args.min_side, max_side=args.max_side, image_format=args.image_format,
        extra_metadata=args.extra_metadata, overwrite=args.overwrite,
    )
    print(f"wrote {len(records)} {args.image_format} images with {args.captions} captions to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
