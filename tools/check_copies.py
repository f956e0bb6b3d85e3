#!/usr/bin/env python
"""Check (and optionally repair) code that training scripts copy from each other.

Why this exists: every ``train_*.py`` script in this suite is standalone (it imports only pip packages), so
code shared between scripts is repeated instead of imported.  Repetition only stays honest if
something notices when the copies drift apart, so each repeat carries a marker comment on the
line directly above its ``def`` or ``class`` (or above its first decorator)::

    # Copied from train_lcm_distill_sd_wds.guidance_scale_embedding
    def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
        ...

    # Copied from train_lcm_distill_sd_wds.log_validation with unet->student, Teacher->Student
    def log_validation(...):
        ...

The reference is ``<module>.<qualified name>``: ``<module>`` is the file ``<root>/<module>.py``
and the qualified name is a top-level function or class, or a member of a class
(``train_x.ClassName.method_name``).  A marker above a class covers the whole class.  The
optional ``with old->new, ...`` pairs are plain, case-sensitive string replacements applied to
the source text in the order given.  The source may itself be a marked copy; the comparison is
always against the source file's current text.

What is compared: the object's lines from its first decorator (or its ``def``/``class`` line)
to its last line, as given by the AST.  The marker comment itself is not part of it.  Each side
is dedented by the indentation of its own first line, so a method may be copied into a
top-level function and vice versa.  Apart from that the text must match exactly (trailing
whitespace included); only line endings and the presence of a final newline are ignored.

Regions.  A larger block of shared code (the training engine, say) is marked as a region in
its source script and copied whole into the others::

    # region ENGINE -- identical in the four stream scripts      (in the source script)
    ...
    # endregion ENGINE

    # region ENGINE copied from train_lcm_distill_sd_wds         (in a copy)
    ...
    # endregion ENGINE

    # region DATA copied from train_lcm_distill_sd_wds with foo->bar, Baz->Qux

Markers are whole-line comments at column 0.  NAME is ``[A-Z][A-Z0-9_]*``; a copy names the
module (``<root>/<module>.py``) holding the region of the same NAME, with optional renames as
above.  Any start or end marker may end in `` -- description``.  The compared text is every line
strictly between the start and end markers, taken as is (not dedented); it must match exactly after renames,
line endings ignored.  A source region may hold definitions that are marked copies of something
else (they are checked as usual); a definition marker inside a copied region is redundant and
not checked on its own, since the region comparison covers it.  A region may be copied from a
region that is itself a copy, as long as the chain ends in a source region (a cycle or a
missing link is an error).  Errors, reported as ``file:line``: an unterminated region, an end
marker without its start, nested regions, a region name used twice in one file, a comment that
looks like a region marker but does not follow the syntax (or is indented), and a copy naming
a file or region that does not exist.

Edited copies.  A copy that differs from its source is either stale (the source changed since the copy was
made: ``--fix`` brings it up to date) or edited (someone changed the copy itself, on purpose or not).  The
two look the same in a diff; the source's git history tells them apart: a copy that equals (after renames)
the source as it was in one of its last ``MAX_HISTORY`` commits, or at HEAD, is stale; one that matches no
version of it was edited.  An edited copy, or one whose source has no git history to compare with, is
reported with a warning and ``--fix`` leaves it alone, since rewriting it would silently throw the edit away:
drop the marker if the change is meant (the definition is then the script's own), or pass
``--overwrite-edited`` to replace it with the source all the same.

``--stats`` prints, per scanned file, these line counts (and a total row):

- ``lines``: all physical lines;
- ``copied``: lines inside checked copies (the compared text of definition copies and region
  copies, each line counted once; a copy's own markers are not included);
- ``regions``: lines inside source regions (between their markers);
- ``main()``: lines of the top-level ``main`` function, ``-`` if there is none;
- ``own``: lines in none of the above three sets nor in the source text of a checked copy in
  another file: the script's own code, plus its imports, blank lines and markers.

Usage (CI runs the first form from the repository root)::

    python tools/check_copies.py                 # check; exit 1 on drift or a broken marker
    python tools/check_copies.py --fix           # rewrite stale copies from their sources
    python tools/check_copies.py --fix --overwrite-edited   # ... and edited ones too
    python tools/check_copies.py --stats         # check, then print line counts per script
    python tools/check_copies.py --root DIR [PATH ...]   # other root, extra files/dirs to scan

The module is standard-library only and importing it has no side effects; tests call
``check_copies(root, fix=False)`` and ``main(argv)`` directly.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import io
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

MARKER_PREFIX = "# Copied from"
# Region markers: whole-line comments at column 0.  A name is upper case so that it reads as a
# label and cannot be confused with a Python name in a definition marker.
_REGION_START_RE = re.compile(
    r"# region (?P<name>[A-Z][A-Z0-9_]*)"
    r"(?: copied from (?P<module>[A-Za-z_]\w*)(?: with (?P<renames>.+?))?)?"
    r"(?: -- .*)?"
)
_REGION_END_RE = re.compile(r"# endregion (?P<name>[A-Z][A-Z0-9_]*)(?: -- .*)?")
# Anything that looks like an attempt at a region marker (``#region``, ``# endregion engine``)
# but does not match the grammar is reported, so that a typo cannot silently leave code unchecked.
_REGION_LIKE_RE = re.compile(r"#\s*(?:end)?region\b")
REGION_SYNTAX = "'# region NAME [copied from MODULE [with old->new, ...]] [-- description]' or '# endregion NAME'"
# A reference is a dotted name with at least two parts: module and object.
_REFERENCE_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
# Lines of a diff shown per mismatch; the full diff is what `--fix` would apply anyway.
MAX_DIFF_LINES = 20
# `--fix` repeats check-and-fix so that chains (c copies b, b copies a) settle in one run.
# A cycle of copies with conflicting renames could never settle, hence the cap.
MAX_FIX_PASSES = 10
# The default root is the repository this file lives in, so the command works from any cwd.
DEFAULT_ROOT = Path(__file__).resolve().parents[1]
# How many of a source's last commits a drifted copy is compared with to tell a stale copy from an edited one.
MAX_HISTORY = 20


@dataclass
class Mismatch:
    """One marked copy that does not match its source, or a marker that cannot be checked.

    ``line`` is the 1-based line of the ``# Copied from`` comment or ``# region`` marker.  ``diff`` is a unified
    diff from the expected text (source with renames applied) to the copy, cut to
    ``MAX_DIFF_LINES`` lines.  ``error`` is non-empty when the marker is broken (unknown
    module, object or region, malformed renames, not above a def/class, broken region
    markers, unparsable file); such
    entries have no diff and cannot be fixed.  ``fixed`` is set by ``--fix``.
    ``edited`` is set for a copy that matches no version of its source in git (``history`` then says whether
    the source had a history to compare with): ``--fix`` leaves those alone unless told to overwrite them.
    """

    path: str
    line: int
    reference: str
    diff: str = ""
    error: str = ""
    fixed: bool = False
    edited: bool = False
    history: bool = True  # False: the source has no git history, so an edit could not be told from drift

    def describe(self) -> str:
        """The one-line message printed for this entry (path shown as stored)."""
        return _describe(self, self.path)


@dataclass
class FileStats:
    """Line counts of one scanned file, for ``--stats`` (see the module docstring)."""

    path: str
    lines: int
    copied: int
    regions: int
    main: int | None  # None: the file has no top-level main()
    own: int


@dataclass
class Report:
    """Result of one run: what went wrong plus the counts for the summary line."""

    mismatches: list[Mismatch] = field(default_factory=list)
    copies_checked: int = 0
    files_checked: int = 0
    stats: list[FileStats] = field(default_factory=list)  # as the files are after any --fix

    def summary(self) -> str:
        drift = [m for m in self.mismatches if not m.error]
        errors = [m for m in self.mismatches if m.error]
        text = (
            f"checked {self.copies_checked} copies in {self.files_checked} files: "
            f"{len(drift)} differ"
        )
        fixed = sum(m.fixed for m in drift)
        if fixed:
            text += f", {fixed} fixed"
        edited = sum(m.edited and not m.fixed for m in drift)
        if edited:
            text += f", {edited} of them edited or of unknown origin (--fix leaves those)"
        if errors:
            text += f", {len(errors)} broken markers"
        return text


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


@dataclass
class _Object:
    """A def or class in a file: 1-based first/last line and the indentation of its first line."""

    start: int
    end: int
    indent: str


@dataclass
class _Region:
    """A well-formed region: 1-based lines of its start and end markers.

    ``module`` is set for a copy (``copied from MODULE``) and ``rename_text`` holds the raw
    ``with ...`` part, parsed only when the copy is checked so a bad rename is reported there.
    """

    name: str
    start: int
    end: int
    module: str | None = None
    rename_text: str | None = None

    @property
    def content(self) -> range:
        """Line numbers strictly between the markers: the compared text."""
        return range(self.start + 1, self.end)


@dataclass
class _ParsedFile:
    path: str
    lines: list[str]  # physical lines with their original line endings
    by_qualname: dict[str, _Object]  # top-level defs/classes and class members
    by_start: dict[int, _Object]  # every def/class, keyed by its first line
    markers: list[tuple[int, str]]  # (line, comment text) of each "# Copied from" comment
    regions: dict[str, _Region] = field(default_factory=dict)  # well-formed regions by name
    broken_regions: set[str] = field(default_factory=set)  # names whose markers are broken
    region_errors: list[tuple[int, str, str]] = field(default_factory=list)  # (line, name, message)


def _read_lines(text: str) -> list[str]:
    """Split into physical lines the way the tokenizer/AST count them (\\n, \\r\\n, \\r only).

    ``str.splitlines`` would also split on form feeds and other exotic separators, which
    would put our line numbers out of step with ``ast``'s.
    """
    return io.StringIO(text, newline="").readlines()


def _parse_file(path: str) -> _ParsedFile:
    """Parse ``path``; raises ``OSError`` or ``SyntaxError`` for the caller to report."""
    with open(path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    return _parse_text(path, text)


def _parse_text(path: str, text: str) -> _ParsedFile:
    """Parse ``text``, the contents of ``path`` (now, or in a past commit); raises ``SyntaxError``."""
    tree = ast.parse(text, filename=path)
    lines = _read_lines(text)

    def locate(node: ast.AST) -> _Object:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        first = lines[start - 1]
        indent = first[: len(first) - len(first.lstrip(" \t"))]
        return _Object(start=start, end=node.end_lineno, indent=indent)

    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    by_qualname: dict[str, _Object] = {}

    def collect(body: list[ast.stmt], prefix: str) -> None:
        # Only names reachable as module.Name or module.Class.member are referable; a later
        # definition of the same name wins, as it does at run time.
        for node in body:
            if isinstance(node, definitions):
                by_qualname[prefix + node.name] = locate(node)
                if isinstance(node, ast.ClassDef):
                    collect(node.body, prefix + node.name + ".")

    collect(tree.body, "")
    by_start = {
        obj.start: obj
        for obj in (locate(node) for node in ast.walk(tree) if isinstance(node, definitions))
    }

    # Markers are real comments on a line of their own; using the tokenizer means text that
    # merely looks like a marker inside a string (e.g. a help message) is not picked up.
    markers = []
    region_comments = []
    for token in tokenize.generate_tokens(io.StringIO(text, newline="").readline):
        if token.type != tokenize.COMMENT or token.line.strip() != token.string.strip():
            continue
        if token.string.startswith(MARKER_PREFIX):
            markers.append((token.start[0], token.string.rstrip()))
        elif _REGION_LIKE_RE.match(token.string):
            region_comments.append((token.start[0], token.start[1], token.string.rstrip()))
    parsed = _ParsedFile(path, lines, by_qualname, by_start, markers)
    _parse_regions(parsed, region_comments)
    return parsed


def _parse_regions(parsed: _ParsedFile, comments: list[tuple[int, int, str]]) -> None:
    """Pair region markers into ``parsed.regions``; structural problems go to ``region_errors``.

    A region involved in a structural problem (nested, duplicated, unterminated) is left out
    of ``regions`` and its name put in ``broken_regions``: comparing a region whose extent is
    uncertain would only produce a misleading diff.
    """
    errors = parsed.region_errors
    stack: list[tuple[_Region, bool]] = []  # open regions, innermost last; flag: still valid
    closed: list[_Region] = []
    for line, column, comment in comments:
        if column != 0:
            errors.append((line, "", f"region marker {comment!r} must start at column 0"))
            continue
        start = _REGION_START_RE.fullmatch(comment)
        end = _REGION_END_RE.fullmatch(comment)
        if start:
            region = _Region(start["name"], line, 0, start["module"], start["renames"])
            if stack:
                outer = stack[-1][0]
                errors.append(
                    (line, region.name, f"region {region.name} starts inside region {outer.name} "
                     f"(line {outer.start}); regions cannot nest")
                )
                stack = [(r, False) for r, _ in stack]
                parsed.broken_regions.update(r.name for r, _ in stack)
                parsed.broken_regions.add(region.name)
            stack.append((region, not stack))
        elif end:
            names = [r.name for r, _ in stack]
            if end["name"] not in names:
                errors.append((line, end["name"], f"'# endregion {end['name']}' without a matching '# region'"))
                continue
            # Regions opened after the one being closed are never closed themselves.
            while stack[-1][0].name != end["name"]:
                region, _ = stack.pop()
                errors.append((region.start, region.name, _unterminated(region)))
                parsed.broken_regions.add(region.name)
            region, valid = stack.pop()
            region.end = line
            if valid:
                closed.append(region)
        else:
            errors.append((line, "", f"malformed region marker {comment!r}: expected {REGION_SYNTAX}"))
    for region, _ in stack:
        errors.append((region.start, region.name, _unterminated(region)))
        parsed.broken_regions.add(region.name)

    first_start: dict[str, int] = {}
    for region in closed:
        if region.name in first_start:
            errors.append(
                (region.start, region.name,
                 f"duplicate region {region.name} (first one at line {first_start[region.name]})")
            )
            parsed.broken_regions.add(region.name)
        else:
            first_start[region.name] = region.start
    errors.sort(key=lambda error: error[0])
    parsed.regions = {r.name: r for r in closed if r.name not in parsed.broken_regions}


def _unterminated(region: _Region) -> str:
    return f"region {region.name} is never closed (no '# endregion {region.name}' after it)"


# --------------------------------------------------------------------------------------------
# The sources' git history (stale or edited?)
# --------------------------------------------------------------------------------------------


def _git(directory: str, *args: str) -> str | None:
    """Output of ``git -C directory ARGS``, or None where git or the repository is missing or the command fails."""
    try:
        result = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _source_history(path: str) -> list[_ParsedFile]:
    """The file at ``path`` as it was at HEAD and in its last ``MAX_HISTORY`` commits, newest first (versions
    that do not parse are skipped); empty when it is not tracked by git."""
    directory = os.path.dirname(os.path.realpath(path))
    top = _git(directory, "rev-parse", "--show-toplevel")
    if not top:
        return []
    top = top.strip()
    relative = os.path.relpath(os.path.realpath(path), top).replace(os.sep, "/")
    commits = (_git(top, "log", f"-n{MAX_HISTORY}", "--format=%H", "--", relative) or "").split()
    versions, seen = [], set()
    for commit in ["HEAD"] + commits:
        text = _git(top, "show", f"{commit}:{relative}")
        if text is None or text in seen:
            continue
        seen.add(text)
        try:
            versions.append(_parse_text(path, text))
        except SyntaxError:
            continue
    return versions


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


class _BadMarker(Exception):
    """A marker that cannot be checked; the message is shown to the user."""


def _parse_marker(comment: str) -> tuple[str, list[tuple[str, str]]]:
    """``# Copied from mod.name with a->b, c->d`` -> ``("mod.name", [("a", "b"), ("c", "d")])``."""
    rest = comment[len(MARKER_PREFIX) :].strip()
    reference, has_with, rename_text = rest.partition(" with ")
    reference = reference.strip()
    if not _REFERENCE_RE.fullmatch(reference):
        raise _BadMarker(
            f"malformed marker {comment!r}: expected '{MARKER_PREFIX} module.name [with old->new, ...]'"
        )
    return reference, _parse_renames(rename_text, comment) if has_with else []


def _parse_renames(rename_text: str, comment: str) -> list[tuple[str, str]]:
    """``"a->b, c->d"`` -> ``[("a", "b"), ("c", "d")]``; ``comment`` is quoted in errors."""
    renames = []
    for item in rename_text.split(","):
        old, arrow, new = item.partition("->")
        old, new = old.strip(), new.strip()
        if not arrow or not old:
            raise _BadMarker(f"malformed rename {item.strip()!r} in {comment!r}: expected 'old->new'")
        renames.append((old, new))
    return renames


def _normalise(line: str, indent: str) -> tuple[bool, str]:
    """Drop the line ending and the object's own indentation.

    Returns ``(had_indent, text)``.  Lines without the indentation (blank lines, or the
    inside of a multi-line string that starts at column 0) are kept as they are, and
    ``had_indent`` tells ``--fix`` not to re-indent them.  A whitespace-only line no longer
    than the indentation counts as empty, since it is just leftover indentation.
    """
    line = line.rstrip("\r\n")
    if line.startswith(indent):
        return True, line[len(indent) :]
    if indent.startswith(line):
        return False, ""
    return False, line


@dataclass
class _Coverage:
    """Lines (1-based) of one checked copy, and of the source text it was compared with."""

    copy_lines: range
    source_path: str  # real path
    source_lines: range


@dataclass
class _Fix:
    path: str
    start: int
    end: int
    new_lines: list[str]


def _diff(expected: list[str], actual: list[str], source_label: str, copy_label: str) -> str:
    lines = list(difflib.unified_diff(expected, actual, source_label, copy_label, lineterm=""))
    if len(lines) > MAX_DIFF_LINES:
        hidden = len(lines) - MAX_DIFF_LINES
        lines = lines[:MAX_DIFF_LINES] + [f"... ({hidden} more diff lines)"]
    return "\n".join(lines)


def _expected_definition(source_file: _ParsedFile, source: _Object, renames) -> list[tuple[bool, str]]:
    """(had_indent, text) of each line of a source definition, renames applied."""
    expected = []
    for raw in source_file.lines[source.start - 1 : source.end]:
        had_indent, text = _normalise(raw, source.indent)
        for old, new in renames:  # renames never contain a newline, so per line == whole text
            text = text.replace(old, new)
        expected.append((had_indent, text))
    return expected


def _expected_region(source_file: _ParsedFile, source: _Region, renames) -> list[str]:
    """The lines of a source region's content, renames applied."""
    expected = []
    for raw in source_file.lines[source.start : source.end - 1]:
        text = raw.rstrip("\r\n")
        for old, new in renames:
            text = text.replace(old, new)
        expected.append(text)
    return expected


def _classify(mismatch: Mismatch, versions: list[_ParsedFile], matches) -> Mismatch:
    """Mark ``mismatch`` edited unless one of the source's past ``versions`` ``matches`` the copy (it is stale)."""
    mismatch.history = bool(versions)
    mismatch.edited = not any(matches(version) for version in versions)
    return mismatch


def _check_marker(
    root: str,
    copy_file: _ParsedFile,
    marker_line: int,
    comment: str,
    load,
    history=lambda path: [],
) -> tuple[Mismatch | None, _Fix | None, _Coverage]:
    """Compare one marked copy with its source; raises ``_BadMarker`` if it cannot be checked."""
    reference, renames = _parse_marker(comment)
    target = copy_file.by_start.get(marker_line + 1)
    if target is None:
        raise _BadMarker(f"marker {comment!r} is not directly above a def or class")

    module, qualname = reference.split(".", 1)
    source_path = os.path.normpath(os.path.join(root, module + ".py"))
    if not os.path.isfile(source_path):
        raise _BadMarker(f"source module {module!r} of {reference} not found (no file {source_path})")
    try:
        source_file = load(source_path)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        raise _BadMarker(f"cannot read source module {source_path} of {reference}: {exc}") from exc
    source = source_file.by_qualname.get(qualname)
    if source is None:
        raise _BadMarker(f"{source_path} has no function or class {qualname!r} (from {reference})")
    if os.path.samefile(source_path, copy_file.path) and source.start == target.start:
        raise _BadMarker(f"marker {comment!r} refers to the object it marks")

    expected = _expected_definition(source_file, source, renames)
    copy_raw = copy_file.lines[target.start - 1 : target.end]
    actual = [_normalise(raw, target.indent)[1] for raw in copy_raw]
    coverage = _Coverage(
        range(target.start, target.end + 1), os.path.realpath(source_path), range(source.start, source.end + 1)
    )
    if [text for _, text in expected] == actual:
        return None, None, coverage

    mismatch = Mismatch(
        path=copy_file.path,
        line=marker_line,
        reference=reference,
        diff=_diff(
            [text for _, text in expected],
            actual,
            f"{reference} (source{', renames applied' if renames else ''})",
            f"{copy_file.path}:{marker_line} (copy)",
        ),
    )

    def matches(version: _ParsedFile) -> bool:
        old = version.by_qualname.get(qualname)
        return old is not None and [text for _, text in _expected_definition(version, old, renames)] == actual

    _classify(mismatch, history(source_path), matches)
    # The rewrite keeps the copy's indentation and line-ending style, and whatever the copy's
    # last line ended with (possibly nothing, at end of file).
    first = copy_raw[0]
    newline = first[len(first.rstrip("\r\n")) :] or "\n"
    last = copy_raw[-1]
    new_lines = [(target.indent + text if had_indent else text) + newline for had_indent, text in expected]
    new_lines[-1] = new_lines[-1].rstrip("\r\n") + last[len(last.rstrip("\r\n")) :]
    return mismatch, _Fix(copy_file.path, target.start, target.end, new_lines), coverage


def _check_region(
    root: str, copy_file: _ParsedFile, region: _Region, load, history=lambda path: []
) -> tuple[Mismatch | None, _Fix | None, _Coverage]:
    """Compare one copied region with its source region; raises ``_BadMarker`` if it cannot."""
    label = f"region {region.module}.{region.name}"
    comment = copy_file.lines[region.start - 1].rstrip("\r\n")
    renames = _parse_renames(region.rename_text, comment) if region.rename_text else []

    # Follow the chain (a copy of a copy of ...) to make sure it ends in a real source region;
    # the comparison itself is only against the immediate source, as for definitions.
    seen = [os.path.realpath(copy_file.path)]
    current, source_file, source = region, None, None
    while current.module is not None:
        path = os.path.normpath(os.path.join(root, current.module + ".py"))
        what = label if current is region else f"region {current.module}.{region.name} (via {label})"
        if not os.path.isfile(path):
            raise _BadMarker(f"source module {current.module!r} of {what} not found (no file {path})")
        if os.path.realpath(path) in seen:
            chain = " -> ".join(Path(p).stem for p in seen + [path]) + f" (region {region.name})"
            raise _BadMarker(f"{label} refers to itself: {chain}")
        seen.append(os.path.realpath(path))
        try:
            next_file = load(path)
        except (OSError, SyntaxError, UnicodeDecodeError) as exc:
            raise _BadMarker(f"cannot read source module {path} of {what}: {exc}") from exc
        found = next_file.regions.get(region.name)
        if found is None:
            broken = region.name in next_file.broken_regions
            raise _BadMarker(
                f"{path} has no region {region.name} (from {what})"
                + ("; its region markers there are broken" if broken else "")
            )
        if source is None:
            source_file, source = next_file, found
        current = found

    expected = _expected_region(source_file, source, renames)
    actual = [raw.rstrip("\r\n") for raw in copy_file.lines[region.start : region.end - 1]]
    coverage = _Coverage(region.content, os.path.realpath(source_file.path), source.content)
    if expected == actual:
        return None, None, coverage
    mismatch = Mismatch(
        path=copy_file.path,
        line=region.start,
        reference=label,
        diff=_diff(
            expected,
            actual,
            f"{label} (source{', renames applied' if renames else ''})",
            f"{copy_file.path}:{region.start} (copy)",
        ),
    )

    def matches(version: _ParsedFile) -> bool:
        old = version.regions.get(region.name)
        return old is not None and _expected_region(version, old, renames) == actual

    _classify(mismatch, history(source_file.path), matches)
    first = copy_file.lines[region.start - 1]
    newline = first[len(first.rstrip("\r\n")) :] or "\n"
    # Content lines always end with a newline: the end marker follows them.
    new_lines = [text + newline for text in expected]
    return mismatch, _Fix(copy_file.path, region.start + 1, region.end - 1, new_lines), coverage


def _files_to_scan(root: str, paths: list[str] | None) -> list[str]:
    """Every ``train_*.py`` in ``root`` plus the given files (directories: all ``*.py`` below)."""
    found = sorted(str(p) for p in Path(root).glob("train_*.py") if p.is_file())
    for extra in paths or []:
        if os.path.isdir(extra):
            found.extend(sorted(str(p) for p in Path(extra).rglob("*.py") if p.is_file()))
        else:
            found.append(extra)
    unique, seen = [], set()
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(os.path.normpath(path))
    return unique


def _check_once(root: str, files: list[str], history) -> tuple[Report, list[tuple[Mismatch, _Fix]]]:
    """One pass over ``files``; reads every file afresh so earlier fixes are seen (``history``, the sources' git
    history, is cached across passes: it does not change)."""
    cache: dict[str, _ParsedFile] = {}

    def load(path: str) -> _ParsedFile:
        key = os.path.realpath(path)
        if key not in cache:
            cache[key] = _parse_file(path)
        return cache[key]

    report = Report(files_checked=len(files))
    fixes = []
    coverages: list[tuple[str, _Coverage]] = []  # (real path of the copy, what it covers)
    for path in files:
        try:
            copy_file = load(path)
        except (OSError, SyntaxError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", None) or 1
            report.mismatches.append(Mismatch(path, line, "", error=f"cannot read file: {exc}"))
            continue
        for line, name, message in copy_file.region_errors:
            report.mismatches.append(Mismatch(path, line, f"region {name}" if name else "region", error=message))
        copied_regions = [r for r in copy_file.regions.values() if r.module is not None]
        checks = []  # (line, reference, check); run in line order so messages come out sorted
        for region in copied_regions:
            check = functools.partial(_check_region, root, copy_file, region, load, history)
            checks.append((region.start, f"region {region.module}.{region.name}", check))
        for marker_line, comment in copy_file.markers:
            # Inside a copied region the region comparison already covers the definition, and
            # reporting the same drift twice would only add noise.
            if any(marker_line in r.content for r in copied_regions):
                continue
            reference = comment[len(MARKER_PREFIX) :].strip().partition(" with ")[0]
            check = functools.partial(_check_marker, root, copy_file, marker_line, comment, load, history)
            checks.append((marker_line, reference, check))
        checks.sort(key=lambda item: item[0])
        for line, reference, check in checks:
            report.copies_checked += 1
            try:
                mismatch, fix, coverage = check()
            except _BadMarker as exc:
                report.mismatches.append(Mismatch(path, line, reference, error=str(exc)))
                continue
            coverages.append((os.path.realpath(path), coverage))
            if mismatch is not None:
                report.mismatches.append(mismatch)
                fixes.append((mismatch, fix))
    report.stats = _stats(files, load, coverages)
    return report, fixes


def _stats(files: list[str], load, coverages: list[tuple[str, _Coverage]]) -> list[FileStats]:
    """Line counts per readable file in ``files``; ``coverages`` are the checked copies."""
    result = []
    for path in files:
        try:
            parsed = load(path)
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # already reported as an error
        real = os.path.realpath(path)
        copied = {n for copy, cov in coverages if copy == real for n in cov.copy_lines}
        regions = {n for r in parsed.regions.values() if r.module is None for n in r.content}
        sourced = {n for _, cov in coverages if cov.source_path == real for n in cov.source_lines}
        main = parsed.by_qualname.get("main")
        result.append(
            FileStats(
                path=path,
                lines=len(parsed.lines),
                copied=len(copied),
                regions=len(regions),
                main=None if main is None else main.end - main.start + 1,
                own=len(parsed.lines) - len(copied | regions | sourced),
            )
        )
    return result


def format_stats(stats: list[FileStats]) -> str:
    """The ``--stats`` table: one row per file and a total row."""
    names = [_display(s.path) for s in stats]
    width = max([len(name) for name in names] + [len("total")])
    columns = ("lines", "copied", "regions", "main()", "own")
    rows = [f"{'file':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for name, s in zip(names, stats):
        values = (s.lines, s.copied, s.regions, "-" if s.main is None else s.main, s.own)
        rows.append(f"{name:<{width}}  " + "  ".join(f"{v:>7}" for v in values))
    totals = [sum(getattr(s, c) or 0 for s in stats) for c in ("lines", "copied", "regions", "main", "own")]
    rows.append(f"{'total':<{width}}  " + "  ".join(f"{v:>7}" for v in totals))
    return "\n".join(rows)


def _apply_fixes(fixes: list[_Fix]) -> None:
    """Splice the new text into each file, bottom-up so earlier line numbers stay valid.

    A fix nested inside another one (a marked method of a marked class) is dropped: the
    outer rewrite already replaces it, and the next pass re-checks the result.
    """
    by_path: dict[str, list[_Fix]] = {}
    for fix in fixes:
        by_path.setdefault(fix.path, []).append(fix)
    for path, file_fixes in by_path.items():
        outer = [
            f
            for f in file_fixes
            if not any(o is not f and o.start <= f.start and f.end <= o.end for o in file_fixes)
        ]
        with open(path, encoding="utf-8", newline="") as handle:
            lines = _read_lines(handle.read())
        for fix in sorted(outer, key=lambda f: f.start, reverse=True):
            lines[fix.start - 1 : fix.end] = fix.new_lines
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write("".join(lines))


def run(root: str | os.PathLike, fix: bool = False, paths: list[str] | None = None,
        overwrite_edited: bool = False) -> Report:
    """Check every marked copy under ``root`` (see module docstring); with ``fix``, repair stale copies, and
    with ``overwrite_edited`` also the edited ones (and those whose source has no git history).

    With ``fix`` the returned report lists each repaired copy with ``fixed=True`` (at the
    line it had when it was found), plus anything still wrong afterwards: broken markers,
    edited copies left alone, or drift that did not settle within ``MAX_FIX_PASSES``.
    """
    root = os.path.normpath(str(root))
    files = _files_to_scan(root, paths)
    result: Report | None = None
    repaired: list[Mismatch] = []
    histories: dict[str, list[_ParsedFile]] = {}

    def history(path: str) -> list[_ParsedFile]:
        key = os.path.realpath(path)
        if key not in histories:
            histories[key] = _source_history(path)
        return histories[key]

    for attempt in range(MAX_FIX_PASSES + 1):
        report, fixes = _check_once(root, files, history)
        fixes = [(m, f) for m, f in fixes if overwrite_edited or not m.edited]
        if result is None:
            result = Report(copies_checked=report.copies_checked, files_checked=report.files_checked)
        if not fix or not fixes or attempt == MAX_FIX_PASSES:
            result.mismatches = repaired + report.mismatches
            result.stats = report.stats
            return result
        _apply_fixes([f for _, f in fixes])
        for mismatch, _ in fixes:
            mismatch.fixed = True
            # A copy further down a chain can be rewritten in more than one pass; say so once.
            key = (mismatch.path, mismatch.line, mismatch.reference)
            if all((m.path, m.line, m.reference) != key for m in repaired):
                repaired.append(mismatch)
    raise AssertionError("unreachable")


def check_copies(root: str | os.PathLike, fix: bool = False, overwrite_edited: bool = False) -> list[Mismatch]:
    """Return the drifted copies and broken markers under ``root`` (empty list: all good)."""
    return run(root, fix=fix, overwrite_edited=overwrite_edited).mismatches


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _display(path: str) -> str:
    """Path relative to the cwd when it is below it, so editors can jump to it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def _describe(mismatch: Mismatch, shown_path: str) -> str:
    where = f"{shown_path}:{mismatch.line}"
    if mismatch.error:
        return f"{where}: error: {mismatch.error}"
    if mismatch.fixed:
        return f"{where}: fixed copy of {mismatch.reference} (rewritten from its source)"
    if not mismatch.edited:
        return f"{where}: copy of {mismatch.reference} differs from its source"
    region = mismatch.reference.startswith("region ")
    what = (f"warning: copy of {mismatch.reference} was edited beyond the marker's renames (it matches no version "
            "of its source in git)" if mismatch.history else
            f"warning: copy of {mismatch.reference} differs from its source, which has no git history to tell "
            "whether the copy was edited")
    keep = ("make the change in the source region instead, or drop this copy's region markers to own it"
            if region else "drop the '# Copied from' marker if the change is meant (the definition is then the "
                           "script's own)")
    return f"{where}: {what}: {keep}; --fix leaves it alone, --fix --overwrite-edited replaces it with the source"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0: all copies match or were fixed)."""
    parser = argparse.ArgumentParser(
        description="Check that '# Copied from module.name' blocks and '# region NAME copied from module' "
        "regions match their source.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="extra files or directories to scan besides ROOT/train_*.py",
    )
    parser.add_argument(
        "--root",
        default=str(DEFAULT_ROOT),
        help="directory holding the scripts; 'module' in a marker is ROOT/module.py "
        "(default: the repository containing this tool)",
    )
    parser.add_argument("--fix", action="store_true",
                        help="rewrite stale copies (their source changed since) from their sources")
    parser.add_argument("--overwrite-edited", action="store_true",
                        help="with --fix, also rewrite copies that were edited themselves (or whose source has no git "
                             "history to tell), discarding the edit")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="also print line counts per file: total, in checked copies, in source regions, main(), own",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root!r} is not a directory")

    if args.overwrite_edited and not args.fix:
        parser.error("--overwrite-edited only applies with --fix")
    report = run(args.root, fix=args.fix, paths=args.paths, overwrite_edited=args.overwrite_edited)
    for mismatch in report.mismatches:
        print(_describe(mismatch, _display(mismatch.path)))
        if mismatch.diff and not mismatch.fixed:
            print(mismatch.diff)
    print(report.summary())
    if args.stats:
        print(format_stats(report.stats))
    failed = any(m.error or not m.fixed for m in report.mismatches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
