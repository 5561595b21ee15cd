"""User mistakes: library errors name settings (`num_classes`), never command-line flags; the command line
shows them as its own flags (--num-classes)."""
import argparse
import ast
from pathlib import Path

import pytest
from cli_helpers import cli_error, one_line_error

import leanvit
from leanvit.cli import flag_names
from leanvit.errors import LeanvitError
from leanvit.models.build import build_model

PKG = Path(leanvit.__file__).parent


def _error_texts(path: Path):
    """The string pieces of every ``LeanvitError(...)`` raised in a module."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LeanvitError":
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield node.lineno, part.value


def test_library_errors_name_no_flags():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "tools" or rel.name == "cli.py":
            continue
        offenders += [f"{rel}:{line}: {text!r}" for line, text in _error_texts(path)
                      if any(w.startswith("--") and w[2:3].isalpha() for w in text.split())]
    assert not offenders, offenders


def test_the_check_sees_a_flag(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('raise LeanvitError(f"--num-classes must be >= 1, got {n}")\n')
    assert [t for _, t in _error_texts(bad)] == ["--num-classes must be >= 1, got "]


def test_the_command_line_shows_its_flags():
    args = argparse.Namespace(num_classes=None, img_size=None)
    msg = "`num_classes` must be >= 1 (`img_size` 8x8; `resume` as set)"
    assert flag_names(msg, args) == "--num-classes must be >= 1 (--img-size 8x8; resume as set)"
    # train takes every recipe key as --key value
    assert flag_names("`auto_resume` and `overwrite`", argparse.Namespace(_accepts_extra=True)) == \
        "--auto-resume and --overwrite"
    with pytest.raises(LeanvitError, match="`num_classes` must be >= 1"):
        build_model("test_vit", num_classes=0)


def test_cli_error_names_the_flag(capsys):
    one_line_error(*cli_error(capsys, "flops", "test_vit", "--img-size", "4"), "--img-size 4x4 is smaller")
    one_line_error(*cli_error(capsys, "eval", "--model", "test_vit", "--data", "digits", "--num-classes", "0"),
                   "--num-classes must be >= 1")
