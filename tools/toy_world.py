"""The toy world: captioned pictures of coloured shapes that a deterministic function can check.

A trained toy teacher (``tools/make_toy_teacher.py``) learns this world from scratch, and the outcome
metrics (``tools/toy_metrics.py``) ask of every generated picture whether it shows what its prompt
asked. Everything here is a pure function of its seed and runs without any download.

The world:

* a 32x32 picture: one shape (circle, square or triangle, axis-aligned, 14-24 px) in one saturated
  colour on a plain grey background whose brightness varies;
* captions ``"a red circle"`` (colour and shape), ``"a circle"`` (shape only) or ``""`` (empty, so
  the teacher learns the unconditional prediction that classifier-free guidance needs);
* the checker finds the saturated pixels (the object; the background is nearly grey), names their
  colour by hue and the shape by how much of its bounding box the largest blob fills (square 1.0,
  circle pi/4, triangle 1/2). On the drawn pictures it is right every time (a test checks it).

Colours: the teacher's world has red, yellow, green and blue. ``magenta`` is never in the teacher's
data: it is the DreamBooth subject ("a sks square" = a magenta square), which the teacher cannot draw
until it is taught.
"""

import colorsys
import random

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
COLORS = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "magenta": (215, 40, 215),
}
TEACHER_COLORS = ("red", "yellow", "green", "blue")
SHAPES = ("circle", "square", "triangle")
# The DreamBooth subject: an identifier the teacher never saw, bound to a colour it never drew.
SUBJECT_TOKEN = "sks"
SUBJECT_COLOR = "magenta"
SUBJECT_SHAPE = "square"
SUBJECT_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_SHAPE}"
CLASS_PROMPT = f"a {SUBJECT_SHAPE}"
# Every word a prompt of this world can hold (the toy tokenizer gives each one token).
VOCABULARY = ("a",) + tuple(COLORS) + SHAPES + (SUBJECT_TOKEN,)

# Caption mix of the teacher's training data.
EMPTY_CAPTION_RATE = 0.1
SHAPE_ONLY_CAPTION_RATE = 0.15

# A pixel is "object" when its colour is this far from grey (max - min channel, in [0, 1]);
# backgrounds stay below 0.05, the named colours are above 0.6.
SATURATION_THRESHOLD = 0.3
MIN_OBJECT_PIXELS = 20


def full_prompts(colors=TEACHER_COLORS):
    """Every colour-and-shape prompt of the teacher's world, in a fixed order."""
    return [f"a {color} {shape}" for color in colors for shape in SHAPES]


def validation_prompts(colors=TEACHER_COLORS):
    """A short list of the teacher's prompts that shows every colour and every shape, for training scripts'
    validation grids (what the toy teachers' validation_prompts.txt holds)."""
    return [f"a {color} {SHAPES[i % len(SHAPES)]}" for i, color in enumerate(colors)]


def draw(color, shape, rng, resolution=RESOLUTION):
    """One picture as a PIL image: ``shape`` in ``color`` (a name of ``COLORS`` or an RGB tuple) on a random
    near-grey background."""
    fill = COLORS[color] if isinstance(color, str) else tuple(color)
    level = rng.uniform(0.25, 0.75)
    background = tuple(int(255 * (level + rng.uniform(-0.02, 0.02))) for _ in range(3))
    image = Image.new("RGB", (resolution, resolution), background)
    painter = ImageDraw.Draw(image)
    size = rng.randint(int(0.45 * resolution), int(0.75 * resolution))
    left = rng.randint(1, resolution - size - 1)
    top = rng.randint(1, resolution - size - 1)
    right, bottom = left + size - 1, top + size - 1
    if shape == "circle":
        painter.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        painter.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        painter.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def caption_for(color, shape, rng):
    """The teacher data's caption mix: 10% empty, 15% shape only, the rest colour and shape."""
    draw_ = rng.random()
    if draw_ < EMPTY_CAPTION_RATE:
        return ""
    if draw_ < EMPTY_CAPTION_RATE + SHAPE_ONLY_CAPTION_RATE:
        return f"a {shape}"
    return f"a {color} {shape}"


def sample_dataset(num_images, seed, colors=TEACHER_COLORS, resolution=RESOLUTION):
    """``num_images`` records ``{"image", "text", "color", "shape"}``, a pure function of ``seed``."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_images):
        color, shape = rng.choice(colors), rng.choice(SHAPES)
        image = draw(color, shape, rng, resolution)
        records.append({"image": image, "text": caption_for(color, shape, rng), "color": color, "shape": shape})
    return records


def _hue_degrees(rgb):
    return 360.0 * colorsys.rgb_to_hsv(*[c / 255.0 for c in rgb])[0]


COLOR_HUES = {name: _hue_degrees(rgb) for name, rgb in COLORS.items()}


def _largest_blob(mask):
    """Boolean mask of the largest 4-connected component of ``mask`` (a small 2-D bool array)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def classify(image):
    """``(color, shape)`` seen in an image (PIL, or HxWx3 array in [0, 1] or uint8); None where unseen.

    The object is the largest blob of saturated pixels; its colour is the named colour nearest in hue
    to the blob's mean colour; its shape comes from the share of its bounding box it fills.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() > 1.5:
        pixels = pixels / 255.0
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    blob = _largest_blob(saturation > SATURATION_THRESHOLD)
    if blob.sum() < MIN_OBJECT_PIXELS:
        return None, None
    mean_rgb = pixels[blob].mean(axis=0) * 255.0
    hue = _hue_degrees(mean_rgb)
    color = min(COLOR_HUES, key=lambda name: min(abs(hue - COLOR_HUES[name]), 360 - abs(hue - COLOR_HUES[name])))
    rows, cols = np.nonzero(blob)
    fill = blob.sum() / float((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "square" if fill > 0.855 else "circle" if fill > 0.72 else "triangle"
    return color, shape


def asked_for(prompt):
    """``(color, shape)`` a prompt asks for (None where it names none); the subject token means its colour."""
    words = prompt.lower().split()
    color = next((w for w in words if w in COLORS), None)
    if SUBJECT_TOKEN in words:
        color = SUBJECT_COLOR
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


def shows_prompt(image, prompt):
    """True when the image shows everything the prompt names (its colour, its shape)."""
    want_color, want_shape = asked_for(prompt)
    color, shape = classify(image)
    if shape is None:
        return False
    return (want_color is None or color == want_color) and (want_shape is None or shape == want_shape)


def prompt_accuracy(images, prompts):
    """Share of ``images`` that show what their prompt asked."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    return sum(shows_prompt(image, prompt) for image, prompt in zip(images, prompts)) / len(images)


def write_image_folder(output_dir, num_images, seed, colors=TEACHER_COLORS, caption_mix=False):
    """Draw ``num_images`` pictures into ``output_dir`` with ``metadata.jsonl`` captions (the layout the
    training scripts and ``tools/make_wds_shards.py`` read); return the records written.

    ``caption_mix=False`` (distillation data) captions every picture with its colour and shape; True
    uses the teacher's training mix (empty and shape-only captions too).
    """
    import json
    import os

    os.makedirs(output_dir, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_images):
        color, shape = rng.choice(colors), rng.choice(SHAPES)
        image = draw(color, shape, rng)
        text = caption_for(color, shape, rng) if caption_mix else f"a {color} {shape}"
        name = f"{i:05d}.png"
        image.save(os.path.join(output_dir, name))
        rows.append({"file_name": name, "text": text, "width": RESOLUTION, "height": RESOLUTION})
    with open(os.path.join(output_dir, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def write_subject_folder(output_dir, num_images=4, seed=7):
    """The DreamBooth instance pictures: ``num_images`` magenta squares, no captions (the instance
    prompt is ``SUBJECT_PROMPT``)."""
    import os

    os.makedirs(output_dir, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_images):
        draw(SUBJECT_COLOR, SUBJECT_SHAPE, rng).save(os.path.join(output_dir, f"subject_{i}.png"))
    return output_dir
