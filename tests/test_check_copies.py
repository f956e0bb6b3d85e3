"""Tests for tools/check_copies.py, the checker that keeps '# Copied from' blocks in sync.

Most tests build tiny fake scripts in a temporary root so they do not depend on the real
training scripts; one test runs the checker on the real repository, as CI does.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "check_copies.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_copies", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


cc = _load_tool()


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8", newline="")
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line containing ``needle``."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


SOURCE = """
import torch


def helper(x, scale=2):
    \"\"\"Scale x.\"\"\"
    y = x * scale
    return y


class Teacher:
    def __init__(self, unet):
        self.unet = unet

    def forward(self, x):
        out = self.unet(x)
        return out


def log_validation(unet, prompts):
    # Teacher side
    images = [unet(p) for p in prompts]
    return images
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write(tmp_path, "train_a.py", SOURCE)
    return tmp_path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


# ------------------------------------------------------------------------------ checking


def test_matching_copy_passes(root: Path):
    write(
        root,
        "train_b.py",
        """
        import torch


        # Copied from train_a.helper
        def helper(x, scale=2):
            \"\"\"Scale x.\"\"\"
            y = x * scale
            return y


        def own_code():
            return 1
        """,
    )
    assert cc.check_copies(str(root)) == []
    report = cc.run(root)
    assert (report.copies_checked, report.files_checked) == (1, 2)


def test_edited_copy_is_reported_with_line_and_diff(root: Path):
    copy = write(
        root,
        "train_b.py",
        """
        import torch


        def unrelated():
            pass


        # Copied from train_a.helper
        def helper(x, scale=2):
            \"\"\"Scale x.\"\"\"
            y = x * scale * 3
            return y
        """,
    )
    (mismatch,) = cc.check_copies(root)
    assert mismatch.path == str(copy)
    assert mismatch.line == line_of(copy, "# Copied from")
    assert mismatch.reference == "train_a.helper"
    assert not mismatch.error and not mismatch.fixed
    assert "-    y = x * scale\n" in mismatch.diff + "\n"
    assert "+    y = x * scale * 3" in mismatch.diff
    assert "differs from its source" in mismatch.describe()


def test_long_diff_is_truncated(root: Path):
    body = "".join(f"    v{i} = {i}\n" for i in range(40))
    (root / "train_a.py").write_text("def big():\n" + body, encoding="utf-8")
    (root / "train_b.py").write_text(
        "# Copied from train_a.big\ndef big():\n" + body.replace("= ", "= -"), encoding="utf-8"
    )
    (mismatch,) = cc.check_copies(root)
    lines = mismatch.diff.splitlines()
    assert len(lines) == cc.MAX_DIFF_LINES + 1
    assert lines[-1].startswith("... (")


def test_only_final_newline_and_line_endings_are_ignored(root: Path):
    # Copy at end of file without a final newline and with CRLF endings: still a match.
    (root / "train_b.py").write_bytes(
        b"# Copied from train_a.helper\r\n"
        b'def helper(x, scale=2):\r\n    """Scale x."""\r\n    y = x * scale\r\n    return y'
    )
    assert cc.check_copies(root) == []
    # Trailing whitespace is a difference.
    write(
        root,
        "train_b.py",
        """
        # Copied from train_a.helper
        def helper(x, scale=2):
            \"\"\"Scale x.\"\"\"
            y = x * scale 
            return y
        """,
    )
    assert len(cc.check_copies(root)) == 1


def test_renames_are_applied_in_order(root: Path):
    write(
        root,
        "train_b.py",
        """
        # Copied from train_a.log_validation with unet->student, Teacher->Student
        def log_validation(student, prompts):
            # Student side
            images = [student(p) for p in prompts]
            return images


        # Copied from train_a.helper with x->z, z->w
        def helper(w, scale=2):
            \"\"\"Scale w.\"\"\"
            y = w * scale
            return y
        """,
    )
    assert cc.check_copies(root) == []

    # Without the renames the same copy differs.
    text = (root / "train_b.py").read_text()
    (root / "train_b.py").write_text(text.replace(" with unet->student, Teacher->Student", ""))
    (mismatch,) = cc.check_copies(root)
    assert mismatch.reference == "train_a.log_validation"


def test_renames_are_case_sensitive(root: Path):
    write(
        root,
        "train_b.py",
        """
        # Copied from train_a.log_validation with unet->student, teacher->student
        def log_validation(student, prompts):
            # student side
            images = [student(p) for p in prompts]
            return images
        """,
    )
    (mismatch,) = cc.check_copies(root)  # "Teacher" is not renamed by "teacher->student"
    assert "-    # Teacher side" in mismatch.diff


def test_method_reference_copied_to_function_and_to_method(root: Path):
    copy = write(
        root,
        "train_b.py",
        """
        # Copied from train_a.Teacher.forward
        def forward(self, x):
            out = self.unet(x)
            return out


        class Student:
            # Copied from train_a.Teacher.__init__ with unet->net
            def __init__(self, net):
                self.net = net

            # Copied from train_a.Teacher.forward
            def forward(self, x):
                out = self.unet(x) + 1
                return out
        """,
    )
    (mismatch,) = cc.check_copies(root)
    assert mismatch.reference == "train_a.Teacher.forward"
    assert mismatch.line == line_of(copy, "    # Copied from train_a.Teacher.forward")
    # Compared dedented: the method body sits at the same depth as a function body.
    assert "+    out = self.unet(x) + 1" in mismatch.diff


def test_class_copy_covers_its_methods(root: Path):
    copy = write(
        root,
        "train_b.py",
        """
        # Copied from train_a.Teacher
        class Teacher:
            def __init__(self, unet):
                self.unet = unet

            def forward(self, x):
                out = self.unet(x)
                return out
        """,
    )
    assert cc.check_copies(root) == []
    copy.write_text(copy.read_text().replace("return out", "return out * 2"))
    (mismatch,) = cc.check_copies(root)
    assert mismatch.line == 1
    assert "+        return out * 2" in mismatch.diff


def test_decorators_belong_to_the_object(root: Path):
    write(root, "train_a.py", "import functools\n\n\n@functools.cache\ndef f():\n    return 1\n")
    write(root, "train_b.py",
          "import functools\n\n\n# Copied from train_a.f\n@functools.cache\ndef f():\n    return 1\n")
    assert cc.check_copies(root) == []
    write(root, "train_b.py",
          "import functools\n\n\n# Copied from train_a.f\n@functools.lru_cache\ndef f():\n    return 1\n")
    assert len(cc.check_copies(root)) == 1


def test_source_that_is_itself_a_copy(root: Path):
    write(root, "train_b.py", "# Copied from train_a.helper with x->z\n" + _helper_text("z"))
    write(root, "train_c.py", "# Copied from train_b.helper with z->q\n" + _helper_text("q"))
    assert cc.check_copies(root) == []


def _helper_text(name: str) -> str:
    return f'def helper({name}, scale=2):\n    """Scale {name}."""\n    y = {name} * scale\n    return y\n'


def test_marker_text_inside_a_string_is_not_a_marker(root: Path):
    write(
        root,
        "train_b.py",
        '''
        HELP = """
        # Copied from train_a.nothing_here
        """
        ''',
    )
    assert cc.run(root).copies_checked == 0
    assert cc.check_copies(root) == []


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "marker, message",
    [
        ("# Copied from train_missing.helper", "source module 'train_missing'"),
        ("# Copied from train_a.no_such_function", "no function or class 'no_such_function'"),
        ("# Copied from train_a.Teacher.no_such_method", "no function or class 'Teacher.no_such_method'"),
        ("# Copied from train_a.helper with x=>y", "malformed rename"),
        ("# Copied from helper", "malformed marker"),
    ],
)
def test_broken_marker_is_an_error(root: Path, marker: str, message: str):
    copy = write(root, "train_b.py", f"import os\n{marker}\n" + _helper_text("x"))
    (problem,) = cc.check_copies(root)
    assert problem.path == str(copy) and problem.line == 2
    assert message in problem.error
    assert problem.diff == ""
    assert cc.main(["--root", str(root)]) == 1
    assert cc.main(["--root", str(root), "--fix"]) == 1  # nothing to fix it from


def test_marker_not_above_a_definition_is_an_error(root: Path):
    write(root, "train_b.py", "# Copied from train_a.helper\n\nX = 1\n")
    (problem,) = cc.check_copies(root)
    assert "not directly above a def or class" in problem.error


# ------------------------------------------------------------------------------ --fix


def test_fix_restores_copies_and_keeps_the_rest_byte_identical(root: Path):
    head = "import torch  # keep me\n\n\nCONSTANT = 3   \n\n\n"
    middle = "\n\ndef own(a):\n    return a\t\n\n\n"
    tail = "\n\nif __name__ == '__main__':\n    own(1)\n"
    good_log = (
        "# Copied from train_a.log_validation with unet->student, Teacher->Student\n"
        "def log_validation(student, prompts):\n"
        "    # Student side\n"
        "    images = [student(p) for p in prompts]\n"
        "    return images\n"
    )
    good_helper = "# Copied from train_a.helper\n" + _helper_text("x")
    # The first copy is longer than its source, the second shorter, so line numbers shift.
    bad_log = good_log.replace("    return images\n", "    images = images[:1]\n    extra = 1\n    return images\n")
    bad_helper = good_helper.replace('    """Scale x."""\n', "")
    copy = root / "train_b.py"
    copy.write_text(head + bad_log + middle + bad_helper + tail, encoding="utf-8")

    fixed = cc.check_copies(root, fix=True, overwrite_edited=True)
    assert [(m.reference, m.fixed) for m in fixed] == [
        ("train_a.log_validation", True),
        ("train_a.helper", True),
    ]
    assert copy.read_text(encoding="utf-8") == head + good_log + middle + good_helper + tail
    assert cc.check_copies(root) == []


def test_fix_reindents_and_keeps_crlf(root: Path):
    copy = root / "train_b.py"
    copy.write_bytes(
        b"class Student:\r\n"
        b"    # Copied from train_a.helper\r\n"
        b"    def helper(x, scale=2):\r\n"
        b"        return 0\r\n"
        b"\r\n"
        b"    other = 1\r\n"
    )
    cc.check_copies(root, fix=True, overwrite_edited=True)
    assert copy.read_bytes() == (
        b"class Student:\r\n"
        b"    # Copied from train_a.helper\r\n"
        b"    def helper(x, scale=2):\r\n"
        b'        """Scale x."""\r\n'
        b"        y = x * scale\r\n"
        b"        return y\r\n"
        b"\r\n"
        b"    other = 1\r\n"
    )


def test_fix_settles_chains_of_copies(root: Path):
    write(root, "train_b.py", "# Copied from train_a.helper\ndef helper(x):\n    pass\n")
    write(root, "train_c.py", "# Copied from train_b.helper\ndef helper(x):\n    pass\n")
    # Only b differs at first; c differs once b is fixed.
    assert [m.path for m in cc.check_copies(root)] == [str(root / "train_b.py")]
    fixed = cc.check_copies(root, fix=True, overwrite_edited=True)
    assert sorted(Path(m.path).name for m in fixed) == ["train_b.py", "train_c.py"]
    assert (root / "train_c.py").read_text() == "# Copied from train_b.helper\n" + _helper_text("x")


def test_fix_of_a_class_with_marked_methods(root: Path):
    write(
        root,
        "train_b.py",
        """
        # Copied from train_a.Teacher
        class Teacher:
            def __init__(self, unet):
                self.unet = None

            # Copied from train_a.Teacher.forward
            def forward(self, x):
                return None
        """,
    )
    assert len(cc.check_copies(root)) == 2
    cc.check_copies(root, fix=True, overwrite_edited=True)
    # The class rewrite drops the inner marker (the source has none); no problems remain.
    assert cc.check_copies(root) == []


# ------------------------------------------------------------------------------ stale or edited (git history)


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=root,
                   check=True, capture_output=True)


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)


def test_fix_updates_stale_copies_and_leaves_edited_ones_until_told(root: Path):
    """The issue-24 trial: a copier changes a marked definition on purpose and keeps its marker; --fix must not
    silently overwrite it. A copy whose SOURCE changed (committed or not) is stale, and --fix updates it."""
    write(root, "train_b.py", "# Copied from train_a.helper\n" + _helper_text("x"))
    write(root, "train_c.py", "# Copied from train_a.log_validation\n"
          "def log_validation(unet, prompts):\n    # Teacher side\n    images = [unet(p) for p in prompts]\n"
          "    return images\n")
    git(root, "init", "-q")
    commit_all(root, "copies in sync")
    source = root / "train_a.py"
    source.write_text(source.read_text().replace("y = x * scale", "y = scale * x"))  # the source moves on
    commit_all(root, "the source changed")
    copy_c = root / "train_c.py"
    copy_c.write_text(copy_c.read_text().replace("return images", "return images[:2]"))  # the copy is edited
    stale, edited = cc.check_copies(root)
    assert (Path(stale.path).name, stale.edited) == ("train_b.py", False)
    assert (Path(edited.path).name, edited.edited, edited.history) == ("train_c.py", True, True)
    assert "copy of train_a.helper differs from its source" == stale.describe().split(": ", 1)[1]
    assert ("warning: copy of train_a.log_validation was edited beyond the marker's renames (it matches no "
            "version of its source in git): drop the '# Copied from' marker if the change is meant") in edited.describe()

    result = run_cli("--root", str(root), "--fix", cwd=root)
    assert result.returncode == 1  # the edited copy is still different
    assert "fixed copy of train_a.helper" in result.stdout
    assert "--fix leaves it alone, --fix --overwrite-edited replaces it with the source" in result.stdout
    assert "y = scale * x" in (root / "train_b.py").read_text() and "images[:2]" in copy_c.read_text()
    assert run_cli("--root", str(root), "--fix", "--overwrite-edited").returncode == 0
    assert "images[:2]" not in copy_c.read_text() and cc.check_copies(root) == []


def test_an_edited_region_copy_is_left_alone_and_a_stale_one_fixed(regions: Path):
    git(regions, "init", "-q")
    commit_all(regions, "in sync")
    copy = regions / "train_b.py"
    copy.write_text(copy.read_text().replace("LOSS_SCALE = 2", "LOSS_SCALE = 3"))
    (edited,) = cc.check_copies(regions, fix=True)
    assert edited.edited and not edited.fixed and "LOSS_SCALE = 3" in copy.read_text()
    assert "make the change in the source region instead" in edited.describe()
    git(regions, "checkout", "train_b.py")
    source = regions / "train_a.py"
    source.write_text(source.read_text().replace("LOSS_SCALE = 2", "LOSS_SCALE = 4"))  # not committed yet
    (fixed,) = cc.check_copies(regions, fix=True)
    assert fixed.fixed and not fixed.edited and "LOSS_SCALE = 4" in copy.read_text()


# ------------------------------------------------------------------------------ CLI


SUMMARY = re.compile(r"^checked (\d+) copies in (\d+) files: (\d+) differ", re.M)


def test_cli_exit_codes_and_summary(root: Path):
    copy = write(root, "train_b.py", "# Copied from train_a.helper\n" + _helper_text("x"))
    clean = run_cli("--root", str(root))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "checked 1 copies in 2 files: 0 differ" in clean.stdout

    copy.write_text(copy.read_text().replace("* scale", "* scale * 2"))
    drift = run_cli("--root", str(root), cwd=root)
    assert drift.returncode == 1
    assert "train_b.py:1: warning: copy of train_a.helper differs from its source" in drift.stdout
    assert "+    y = x * scale * 2" in drift.stdout
    assert SUMMARY.search(drift.stdout).groups() == ("1", "2", "1")

    # no git history here: the checker cannot tell an edited copy from a stale one, and leaves it alone
    left = run_cli("--root", str(root), "--fix")
    assert left.returncode == 1 and "y = x * scale * 2" in copy.read_text()
    assert "differs from its source, which has no git history to tell whether the copy was edited" in left.stdout
    assert "1 of them edited or of unknown origin (--fix leaves those)" in left.stdout
    fixed = run_cli("--root", str(root), "--fix", "--overwrite-edited")
    assert fixed.returncode == 0
    assert "fixed copy of train_a.helper" in fixed.stdout
    assert run_cli("--root", str(root)).returncode == 0


def test_cli_scans_extra_paths(root: Path):
    extra_dir = root / "examples"
    extra_dir.mkdir()
    write(extra_dir, "demo.py", "# Copied from train_a.helper\ndef helper(x):\n    pass\n")
    assert cc.main(["--root", str(root)]) == 0
    assert cc.main(["--root", str(root), str(extra_dir)]) == 1
    assert cc.main(["--root", str(root), str(extra_dir / "demo.py")]) == 1


def test_import_has_no_side_effects(capsys):
    _load_tool()
    assert capsys.readouterr() == ("", "")


def test_real_repository_is_clean():
    """What CI runs: the real training scripts' copies must match their sources."""
    result = run_cli(cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SUMMARY.search(result.stdout), result.stdout


# ------------------------------------------------------------------------------ regions


REGION_SOURCE = """
import torch


# region ENGINE -- identical in the stream scripts
def step(unet, batch):
    loss = unet(batch)
    return loss


LOSS_SCALE = 2
# endregion ENGINE


def main():
    step(None, None)
    return 0
"""

REGION_COPY = """
import torch


# region ENGINE copied from train_a
def step(unet, batch):
    loss = unet(batch)
    return loss


LOSS_SCALE = 2
# endregion ENGINE


def main():
    return 1
"""


@pytest.fixture
def regions(tmp_path: Path) -> Path:
    write(tmp_path, "train_a.py", REGION_SOURCE)
    write(tmp_path, "train_b.py", REGION_COPY)
    return tmp_path


def test_region_copy_matches(regions: Path):
    assert cc.check_copies(regions) == []
    assert cc.run(regions).copies_checked == 1


def test_region_copy_drift_is_reported_at_its_start_marker(regions: Path):
    copy = regions / "train_b.py"
    copy.write_text(copy.read_text().replace("LOSS_SCALE = 2", "LOSS_SCALE = 3"))
    (mismatch,) = cc.check_copies(regions)
    assert (mismatch.path, mismatch.line) == (str(copy), line_of(copy, "# region ENGINE"))
    assert mismatch.reference == "region train_a.ENGINE"
    assert "-LOSS_SCALE = 2" in mismatch.diff and "+LOSS_SCALE = 3" in mismatch.diff
    assert "copy of region train_a.ENGINE differs from its source" in mismatch.describe()


def test_region_marker_lines_are_not_compared(regions: Path):
    # Descriptions after " -- " and the markers themselves may differ; line endings are ignored.
    copy = regions / "train_b.py"
    text = copy.read_text().replace("# region ENGINE copied from train_a", "# region ENGINE copied from train_a -- x")
    copy.write_bytes(text.replace("\n", "\r\n").encode())
    assert cc.check_copies(regions) == []


def test_region_renames(regions: Path):
    copy = regions / "train_b.py"
    marker = "copied from train_a with unet->student, LOSS->GAIN"
    copy.write_text(copy.read_text().replace("copied from train_a", marker))
    assert len(cc.check_copies(regions)) == 1
    renamed = REGION_COPY.replace("unet", "student").replace("LOSS_SCALE", "GAIN_SCALE")
    copy.write_text(renamed.replace("copied from train_a", marker))
    assert cc.check_copies(regions) == []


def test_region_chain(regions: Path):
    chained = REGION_COPY.replace("copied from train_a", "copied from train_b")
    write(regions, "train_c.py", chained)
    assert cc.check_copies(regions) == []
    # Compared with the immediate source: drift in b is reported for b and for c.
    copy = regions / "train_b.py"
    copy.write_text(copy.read_text().replace("LOSS_SCALE = 2", "LOSS_SCALE = 3"))
    assert sorted(Path(m.path).name for m in cc.check_copies(regions)) == ["train_b.py", "train_c.py"]


def test_region_chain_cycle_is_an_error(regions: Path):
    source = regions / "train_a.py"
    source.write_text(source.read_text().replace("# region ENGINE --", "# region ENGINE copied from train_b --"))
    problems = cc.check_copies(regions)
    assert sorted(Path(p.path).name for p in problems) == ["train_a.py", "train_b.py"]
    assert all("refers to itself" in p.error for p in problems)


def test_region_copy_of_a_broken_chain_is_an_error(regions: Path):
    write(regions, "train_c.py", REGION_COPY.replace("copied from train_a", "copied from train_b"))
    copy = regions / "train_b.py"
    copy.write_text(copy.read_text().replace("copied from train_a", "copied from train_gone"))
    problems = cc.check_copies(regions)
    assert [(Path(p.path).name, "train_gone" in p.error) for p in problems] == [
        ("train_b.py", True),
        ("train_c.py", True),
    ]
    assert "via region train_b.ENGINE" in problems[1].error


def test_definition_markers_inside_regions(regions: Path):
    # In a source region a definition marker is checked as usual; in a copied region it is
    # redundant, so a drifted definition there is reported once, by the region.
    write(regions, "train_s.py", "def step(unet, batch):\n    loss = unet(batch)\n    return loss\n")
    marked = REGION_SOURCE.replace("def step", "# Copied from train_s.step\ndef step")
    write(regions, "train_a.py", marked)
    write(regions, "train_b.py", marked.replace("# region ENGINE --", "# region ENGINE copied from train_a --"))
    report = cc.run(regions)
    assert report.mismatches == [] and report.copies_checked == 2  # a: def; b: region (def skipped)
    copy = regions / "train_b.py"
    copy.write_text(copy.read_text().replace("return loss", "return -loss"))
    (mismatch,) = cc.check_copies(regions)
    assert mismatch.reference == "region train_a.ENGINE"


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("# region ENGINE\nX = 1\n", 1, "region ENGINE is never closed"),
        ("X = 1\n# endregion ENGINE\n", 2, "'# endregion ENGINE' without a matching '# region'"),
        ("# region A\n# region B\n# endregion B\n# endregion A\n", 2, "regions cannot nest"),
        ("# region A\n# endregion A\n# region A\n# endregion A\n", 3, "duplicate region A (first one at line 1)"),
        ("# region engine\n# endregion engine\n", 1, "malformed region marker"),
        ("#region ENGINE\n", 1, "malformed region marker"),
        ("def f():\n    # region ENGINE\n    pass\n", 2, "must start at column 0"),
        ("# region A copied from train_a with x=>y\n# endregion A\n", 1, "malformed rename"),
        ("# region A copied from train_missing\n# endregion A\n", 1, "source module 'train_missing'"),
        ("# region NOPE copied from train_a\n# endregion NOPE\n", 1, "has no region NOPE"),
        ("# region ENGINE copied from train_c\n# endregion ENGINE\n", 1, "refers to itself"),
    ],
)
def test_broken_region_markers(regions: Path, text: str, line: int, message: str):
    copy = write(regions, "train_c.py", text)
    problems = [p for p in cc.check_copies(regions) if p.path == str(copy)]
    assert problems and all(p.error and not p.diff for p in problems)
    assert (problems[0].line, message in problems[0].error) == (line, True), problems[0].error
    assert cc.main(["--root", str(regions), "--fix"]) == 1


def test_copy_of_a_broken_source_region_says_so(regions: Path):
    source = regions / "train_a.py"
    source.write_text(source.read_text().replace("# endregion ENGINE\n", ""))
    problems = cc.check_copies(regions)
    assert [Path(p.path).name for p in problems] == ["train_a.py", "train_b.py"]
    assert "region markers there are broken" in problems[1].error


def test_region_text_in_a_string_is_not_a_marker(regions: Path):
    write(regions, "train_c.py", 'HELP = """\n# region ENGINE copied from train_nowhere\n"""\n')
    assert cc.check_copies(regions) == []


def test_fix_rewrites_region_copies_with_renames_and_crlf(regions: Path):
    copy = regions / "train_b.py"
    head = "import torch\r\n\r\n\r\n# region ENGINE copied from train_a with unet->net\r\n"
    tail = "# endregion ENGINE\r\n\r\n\r\ndef main():\r\n    return 1\r\n"
    copy.write_bytes((head + "old = 1\r\n" + tail).encode())
    (fixed,) = cc.check_copies(regions, fix=True, overwrite_edited=True)
    assert fixed.fixed and fixed.reference == "region train_a.ENGINE"
    body = "def step(net, batch):\n    loss = net(batch)\n    return loss\n\n\nLOSS_SCALE = 2\n"
    assert copy.read_bytes() == (head + body.replace("\n", "\r\n") + tail).encode()
    assert cc.check_copies(regions) == []


def test_fix_fills_an_empty_region_and_settles_chains(regions: Path):
    write(regions, "train_b.py", "# region ENGINE copied from train_a\n# endregion ENGINE\nX = 1\n")
    write(regions, "train_c.py", "# region ENGINE copied from train_b\nstale = 0\n# endregion ENGINE\n")
    fixed = cc.check_copies(regions, fix=True, overwrite_edited=True)
    assert sorted(Path(m.path).name for m in fixed) == ["train_b.py", "train_c.py"]
    assert all(m.fixed for m in fixed)
    body = "def step(unet, batch):\n    loss = unet(batch)\n    return loss\n\n\nLOSS_SCALE = 2\n"
    assert (regions / "train_c.py").read_text() == (
        "# region ENGINE copied from train_b\n" + body + "# endregion ENGINE\n"
    )
    assert (regions / "train_b.py").read_text().endswith("# endregion ENGINE\nX = 1\n")


# ------------------------------------------------------------------------------ --stats


def test_stats_counts(regions: Path):
    write(regions, "train_c.py", "# Copied from train_a.step\ndef step(unet, batch):\n    return 0\n")
    stats = {Path(s.path).name: s for s in cc.run(regions).stats}
    a, b, c = stats["train_a.py"], stats["train_b.py"], stats["train_c.py"]
    # a: 16 lines; its region holds 6, main() 3; own = everything outside the region.
    assert (a.lines, a.copied, a.regions, a.main, a.own) == (16, 0, 6, 3, 10)
    # b: the copied region's 6 lines are copied; c: the def copy (2 lines; the marker is its
    # own line), no main().
    assert (b.lines, b.copied, b.regions, b.main, b.own) == (15, 6, 0, 2, 9)
    assert (c.lines, c.copied, c.regions, c.main, c.own) == (3, 2, 0, None, 1)


def test_stats_count_overlapping_copies_once(regions: Path):
    # The definition marker inside the copied region is not checked, so its lines count once.
    text = REGION_COPY.replace("def step", "# Copied from train_a.step\ndef step")
    write(regions, "train_b.py", text)
    (stats,) = [s for s in cc.run(regions).stats if s.path.endswith("train_b.py")]
    assert stats.copied == 7  # the region's content, the marker line included


def test_cli_stats_table(regions: Path):
    result = run_cli("--root", str(regions), "--stats", cwd=regions)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["train_a.py"] == ["16", "0", "6", "3", "10"]
    assert rows["train_b.py"] == ["15", "6", "0", "2", "9"]
    assert rows["total"] == ["31", "6", "6", "5", "19"]
    assert "main()" in result.stdout.splitlines()[1]
