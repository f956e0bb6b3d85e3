#!/usr/bin/env python
"""Pack an image folder with captions into WebDataset tar shards.

The ``_wds`` training scripts read WebDataset shards; this turns any local image folder into
them. Each sample in a shard is a group of tar members sharing one key::

    KEY.jpg | KEY.jpeg | KEY.png | KEY.webp   the original image bytes (never re-encoded)
    KEY.txt                                   the caption
    KEY.json                                  {"file_name", "width", "height", "caption", ...extra}

Captions come from, per image, in this order: a ``metadata.jsonl`` / ``metadata.csv`` row (Hugging
Face imagefolder convention: a ``file_name`` column relative to the table's folder and a caption
column, ``--caption_column`` or else the first of "text", "caption"), then a ``.txt`` sidecar with
the image's stem. Every other table column (e.g. ``aesthetic``, ``pwatermark``) is copied into
the sample's json, so data filters can use it later. Tables and captions that are not UTF-8 are
read as Windows-1252 (what Excel and Notepad write on Windows) and reported, never mangled.

Keys are the image's relative path without extension, with "/" and "." replaced by "_":
webdataset splits key from extension at the first dot of a member's name, so a dot in a key
would silently split one sample into two broken ones. Clashing keys get a "_2", "_3" suffix.

Filters: ``--min_bytes`` drops tiny files, ``--min_size`` drops images whose shorter side is
smaller (the size is read from the header, without decoding pixels); unreadable or corrupt
images are skipped. Every dropped image is counted under its reason, and the counts are printed
at the end, one line per reason. A run that keeps nothing is an error, not an empty dataset.

Tars are written with Python's ``tarfile`` in a fixed order with zeroed mtime/owner, so the
same input and options give byte-identical shards. Each shard is written to a temporary name and
renamed when complete, so a crash never leaves a truncated shard behind under a real name.

Usage::

    python tools/make_wds_shards.py --input_dir DIR --output_dir OUT [--samples_per_shard 1000]
        [--prefix shard] [--caption_column text] [--min_size 0] [--min_bytes 0]
        [--shuffle --seed 0] [--overwrite]
"""

import argparse
import collections
import csv
import io
import json
import os
import random
import re
import sys
import tarfile

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_COLUMNS = ("text", "caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# Skip reasons (the keys of the "skipped" counts).
REASON_NO_FILE = "metadata row without an image file"
REASON_UNREADABLE = "unreadable or corrupt image"
REASON_NO_CAPTION = "no caption (no metadata caption, no .txt sidecar)"


class NoSamplesError(RuntimeError):
    """Raised when the filters and captions leave no sample to write."""


def _parse_csv_value(value):
    """CSV cells are strings; give numbers back their type so json metadata is usable as-is."""
    if value is None or value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def plural(count, noun):
    """'1 shard', '2 shards': the summary lines name what they count."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# Copied from train_lcm_distill_sd_wds.decode_text
def decode_text(raw):
    """(text, True) of UTF-8 bytes (a byte-order mark dropped) or of UTF-16 ones with their byte-order mark (Notepad's
    "Unicode"), else (the bytes read as Windows-1252, False).

    Captions and metadata saved on Windows are often cp1252 ("café" is b"caf\\xe9"): read as UTF-8 with
    replacement they would train as "caf\\ufffd" without a word. cp1252 maps all but five bytes (those become
    U+FFFD); the caller reports the fallback."""
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16"), True
        return raw.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), False


def _read_text(path):
    """A metadata file's text (see decode_text), with a warning when it is not UTF-8."""
    with open(path, "rb") as f:
        text, utf8 = decode_text(f.read())
    if not utf8:
        print(f"make_wds_shards.py: warning: {path} is not UTF-8; read as Windows-1252", file=sys.stderr)
    return text


def _read_table(path):
    """Rows (line number, dict) and column names of one metadata.jsonl / metadata.csv file.

    CSV as spreadsheets write it: byte-order mark, CRLF, quoted cells with commas or line breaks, and ';' or
    tab separators (the one whose header names file_name)."""
    text = _read_text(path)
    if path.endswith(".jsonl"):
        rows = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
            rows.append((line_number, row))
        columns = list(dict.fromkeys(key for _, row in rows for key in row))
    else:
        header = text.splitlines()[0] if text.strip() else ""
        delimiter = next((d for d in (",", ";", "\t") if "file_name" in next(csv.reader([header], delimiter=d), [])),
                         ",")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            # file_name stays text ("001.png" is not a number); a short row's missing cells are None
            rows = [(reader.line_num, {k: v if k == "file_name" else _parse_csv_value(v)
                                       for k, v in row.items() if k is not None}) for row in reader]
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: {e}") from None
        columns = list(reader.fieldnames or [])
    return rows, columns


def read_metadata(input_dir, caption_column=None, skip_dir=None):
    """Map each image path named in the folder's metadata tables to ``(caption or None, extras)``.

    Tables may sit in any sub-folder; their ``file_name`` is relative to the table's folder (the
    imagefolder convention). ``caption_column=None`` uses the first of "text"/"caption" present;
    a table without a caption column still contributes its extra columns. A named
    ``caption_column`` missing from a table is an error rather than a silently caption-less run.
    Paths in the result are normalised, relative to ``input_dir``, with "/" separators.
    ``skip_dir`` (a realpath) is not searched.
    """
    metadata = {}
    for folder, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip_dir)
        tables = [name for name in METADATA_FILES if name in files]
        if len(tables) > 1:
            raise ValueError(f"{folder} holds both metadata.jsonl and metadata.csv; keep only one")
        if not tables:
            continue
        path = os.path.join(folder, tables[0])
        rows, columns = _read_table(path)
        if "file_name" not in columns:
            raise ValueError(f"{path} has no 'file_name' column (columns: {', '.join(columns) or 'none'})")
        if caption_column is not None:
            if caption_column not in columns:
                raise ValueError(f"{path} has no caption column {caption_column!r} (columns: {', '.join(columns)})")
            column = caption_column
        else:
            column = next((c for c in DEFAULT_CAPTION_COLUMNS if c in columns), None)
        rel_folder = os.path.relpath(folder, input_dir)
        for line_number, row in rows:
            if not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
                raise ValueError(f"{path}:{line_number}: no 'file_name' (the image's path) in this row")
            rel_path = os.path.normpath(os.path.join(rel_folder, row["file_name"].strip())).replace(os.sep, "/")
            caption = row.get(column) if column is not None else None
            extras = {k: v for k, v in row.items() if k not in ("file_name", column)}
            metadata[rel_path] = (None if caption is None else str(caption), extras)
    return metadata


def find_images(input_dir, skip_dir=None):
    """Relative paths ("/"-separated, sorted) of every image file under ``input_dir`` but ``skip_dir``."""
    found = []
    for folder, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip_dir)
        for name in files:
            if os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(folder, name), input_dir).replace(os.sep, "/"))
    return sorted(found)


def sample_key(rel_path):
    """WebDataset key for an image: relative path without extension, "/" and "." -> "_"."""
    stem = rel_path.rsplit(".", 1)[0]
    return re.sub(r"[/.]", "_", stem)


def probe_image(path):
    """``(width, height)`` from the image header; raises if PIL cannot identify or verify it.

    ``verify()`` checks the file's structure (e.g. PNG chunk CRCs) without decoding pixels,
    which catches most truncated or corrupted files cheaply.
    """
    with Image.open(path) as image:
        size = image.size
        image.verify()
    return size


def _add_member(tar, name, data):
    """Add bytes to the tar with fixed metadata, so identical input gives identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def shard_pattern(prefix):
    """Regex for the shard file names this tool writes with ``prefix``."""
    return re.compile(re.escape(prefix) + r"-\d{5,}\.tar")


def existing_shards(output_dir, prefix):
    """Names of shards from an earlier run with the same prefix in ``output_dir``."""
    if not os.path.isdir(output_dir):
        return []
    pattern = shard_pattern(prefix)
    return sorted(name for name in os.listdir(output_dir) if pattern.fullmatch(name))


def make_shards(input_dir, output_dir, samples_per_shard=1000, prefix="shard", caption_column=None,
                min_size=0, min_bytes=0, shuffle=False, seed=0, overwrite=False):
    """Write the image folder ``input_dir`` as WebDataset shards to ``output_dir``.

    Returns ``{"kept": int, "skipped": {reason: count}, "num_skipped": int, "shards": [paths],
    "url_pattern": "OUT/shard-{00000..0000N}.tar", "not_utf8": [.txt captions read as Windows-1252]}``.
    Raises ``NoSamplesError`` when nothing is kept, ``FileExistsError`` when shards with this prefix
    already exist and not ``overwrite`` (with ``overwrite`` they are deleted first, so no stale shard
    outlives a smaller rerun), and ``ValueError`` for unusable metadata tables.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir {input_dir!r} is not a directory")
    stale = existing_shards(output_dir, prefix)
    if stale and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds {len(stale)} '{prefix}-*.tar' shards (use overwrite / --overwrite)")
    # Never pack our own output when output_dir sits inside input_dir.
    skip_dir = os.path.realpath(output_dir)

    metadata = read_metadata(input_dir, caption_column, skip_dir)
    images = find_images(input_dir, skip_dir)
    skipped = collections.Counter()
    image_set = set(images)
    orphan_rows = sum(1 for rel_path in metadata if rel_path not in image_set)
    if orphan_rows:
        skipped[REASON_NO_FILE] = orphan_rows

    # Pass 1: decide which images to keep, reading only headers. Bytes are read when writing,
    # so memory stays flat however large the folder is.
    kept, used_keys, not_utf8 = [], set(), []
    for rel_path in images:
        path = os.path.join(input_dir, rel_path)
        if os.path.getsize(path) < min_bytes:
            skipped[f"file smaller than min_bytes={min_bytes}"] += 1
            continue
        try:
            width, height = probe_image(path)
        except Exception:  # PIL raises many types for bad files; all mean "cannot use it"
            skipped[REASON_UNREADABLE] += 1
            continue
        if min(width, height) < min_size:
            skipped[f"shorter side below min_size={min_size}"] += 1
            continue
        caption, extras = metadata.get(rel_path, (None, {}))
        if caption is None:
            sidecar = path.rsplit(".", 1)[0] + ".txt"
            if os.path.isfile(sidecar):
                with open(sidecar, "rb") as f:
                    caption, utf8 = decode_text(f.read())
                caption = caption.strip()
                if not utf8:
                    not_utf8.append(rel_path.rsplit(".", 1)[0] + ".txt")
        if caption is None:
            skipped[REASON_NO_CAPTION] += 1
            continue
        key = base_key = sample_key(rel_path)
        suffix = 2
        while key in used_keys:  # e.g. a.png and a.jpg, or a/b.png and a_b.png
            key, suffix = f"{base_key}_{suffix}", suffix + 1
        used_keys.add(key)
        info = {**extras, "file_name": rel_path, "width": width, "height": height, "caption": caption}
        kept.append((key, rel_path, caption, info))

    if not kept:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
        reasons = reasons or "no image files found"
        raise NoSamplesError(f"no sample kept from {input_dir} ({len(images)} image files; skipped: {reasons})")
    if shuffle:
        random.Random(seed).shuffle(kept)

    # Pass 2: write the shards.
    os.makedirs(output_dir, exist_ok=True)
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    shards = []
    for first in range(0, len(kept), samples_per_shard):
        shard_path = os.path.join(output_dir, f"{prefix}-{len(shards):05d}.tar")
        with tarfile.open(shard_path + ".tmp", "w") as tar:
            for key, rel_path, caption, info in kept[first:first + samples_per_shard]:
                with open(os.path.join(input_dir, rel_path), "rb") as f:
                    image_bytes = f.read()
                ext = rel_path.rsplit(".", 1)[-1].lower()
                members = {
                    ext: image_bytes,
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
                for member_ext in sorted(members):
                    _add_member(tar, f"{key}.{member_ext}", members[member_ext])
        os.replace(shard_path + ".tmp", shard_path)
        shards.append(shard_path)

    return {
        "kept": len(kept),
        "skipped": dict(sorted(skipped.items())),
        "num_skipped": sum(skipped.values()),
        "shards": shards,
        "url_pattern": os.path.join(output_dir, f"{prefix}-{{00000..{len(shards) - 1:05d}}}.tar"),
        "not_utf8": not_utf8,
    }


def format_summary(result):
    """The end-of-run report: the kept count and shard urls, one line per skip reason, and the caption files
    that were not UTF-8."""
    lines = [f"kept {plural(result['kept'], 'sample')} in {plural(len(result['shards']), 'shard')}: "
             f"{result['url_pattern']}"]
    lines += [f"skipped {count}: {reason}" for reason, count in result["skipped"].items()]
    not_utf8 = result.get("not_utf8")
    if not_utf8:
        lines.append(f"read {plural(len(not_utf8), 'caption file')} as Windows-1252 (not UTF-8), e.g. {not_utf8[0]}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pack an image folder with captions into WebDataset tar shards.")
    parser.add_argument("--input_dir", required=True, help="image folder (.txt sidecars or metadata.jsonl/.csv)")
    parser.add_argument("--output_dir", required=True, help="where to write PREFIX-00000.tar, ...")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="samples per tar (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    parser.add_argument("--caption_column", default=None,
                        help="caption column of metadata.jsonl/.csv (default: 'text', else 'caption')")
    parser.add_argument("--min_size", type=int, default=0, help="drop images whose shorter side is below this")
    parser.add_argument("--min_bytes", type=int, default=0, help="drop image files smaller than this many bytes")
    parser.add_argument("--shuffle", action="store_true", help="shuffle samples across shards (see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in output_dir")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input_dir):
        parser.error(f"--input_dir {args.input_dir} is not a directory")
    if args.samples_per_shard < 1:
        parser.error(f"--samples_per_shard must be >= 1, got {args.samples_per_shard}")
    if args.min_size < 0 or args.min_bytes < 0:
        parser.error("--min_size and --min_bytes must be >= 0")
    if not args.prefix or "/" in args.prefix or os.sep in args.prefix:
        parser.error(f"--prefix must be a non-empty file name prefix without '/', got {args.prefix!r}")
    if existing_shards(args.output_dir, args.prefix) and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} already holds {args.prefix}-*.tar shards; "
                     "pass --overwrite to replace them")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        result = make_shards(
            args.input_dir, args.output_dir, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
            caption_column=args.caption_column, min_size=args.min_size, min_bytes=args.min_bytes,
            shuffle=args.shuffle, seed=args.seed, overwrite=args.overwrite,
        )
    except (NoSamplesError, ValueError, FileExistsError) as e:
        print(f"make_wds_shards.py: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
