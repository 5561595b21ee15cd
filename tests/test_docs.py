"""The documentation: the mkdocs site builds strictly, README links resolve, and every command shown runs.

The strict build fails on a broken link or anchor, a page missing from the nav, a missing included file and
an API reference that cannot be collected from the docstrings.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from leanvit.cli import COMMANDS, build_parser, plugin_options
from leanvit.train import list_recipes

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_docs_build_strict(tmp_path):
    result = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    # the API reference was generated from the docstrings, not left as "::: leanvit.reduction"
    api = (tmp_path / "site" / "api" / "reduction" / "index.html").read_text()
    assert 'id="leanvit.reduction.apply_reduction"' in api
    assert ":::" not in api
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_docs_build_fails_on_broken_link_and_unlisted_page(tmp_path):
    """The strict settings of mkdocs.yml catch what they must (without the slower API reference)."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nplugins: [search]\n"
                      f"markdown_extensions: [toc, admonition, tables]\n")
    assert _mkdocs(config, tmp_path / "ok").returncode == 0

    page = docs / "sweep.md"
    good = page.read_text()
    page.write_text(good + "\n[a page that is not there](no-such-page.md)\n")
    result = _mkdocs(config, tmp_path / "broken")
    assert result.returncode != 0 and "no-such-page.md" in result.stdout + result.stderr

    page.write_text(good + "\n[a heading that is not there](dense-prediction.md#no-such-heading)\n")
    result = _mkdocs(config, tmp_path / "anchor")
    assert result.returncode != 0 and "no-such-heading" in result.stdout + result.stderr

    page.write_text(good)
    (docs / "orphan.md").write_text("# Not in the nav\n")
    result = _mkdocs(config, tmp_path / "orphan")
    assert result.returncode != 0 and "orphan.md" in result.stdout + result.stderr


def _anchors(md: Path):
    return {slugify(re.sub(r"[`*]", "", m.group(1)).strip(), "-")
            for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", md.read_text(), re.M)}


def _local_links(md: Path):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_readme_links_resolve():
    links = list(_local_links(ROOT / "README.md"))
    assert any(t.startswith("docs/") for t in links), "the README links into the docs"
    for target in links:
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else ROOT / "README.md"
        assert file.exists(), f"README.md links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"README.md links to {target}: no such heading"


def _code_blocks(md: Path, langs=("", "bash", "sh", "console")):
    """The code blocks of a markdown file in these languages (default: shell, fenced ```bash, ```sh or ```)."""
    blocks, lang, lines = [], None, []
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in langs:
                    blocks.append("\n".join(lines) + "\n")
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _commands(md: Path):
    """``leanvit ...`` and ``torchrun ... -m leanvit.cli ...`` lines of shell code blocks (comments cut)."""
    for block in _code_blocks(md):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(".venv/bin/"):
                line = line[len(".venv/bin/"):]
            if line.startswith("python3 -m venv"):
                line = line.split("&&")[-1].strip().replace(".venv/bin/", "")
            if "-m leanvit.cli " in line:
                line = "leanvit " + line.split("-m leanvit.cli ", 1)[1]
            if line.startswith(("leanvit ", "python benchmarks/")):
                yield line


def test_doc_commands_parse():
    recipes = set(list_recipes())
    seen = 0
    for md in DOC_FILES:
        for line in _commands(md):
            words = shlex.split(line, comments=True)
            where = f"{md.relative_to(ROOT)}: {line}"
            if words[0] == "python":
                assert (ROOT / words[1]).exists(), where
                continue
            _, words[1:] = plugin_options(words[1:])  # leanvit --plugin MODULE COMMAND ...
            command, args = words[1], words[2:]
            assert command in COMMANDS, where
            parser = build_parser(command)
            try:
                parsed, extra = parser.parse_known_args([command, *args])
            except SystemExit:
                pytest.fail(f"does not parse: {where}")
            if not getattr(parsed, "_accepts_extra", False):
                assert not extra, f"unknown options {extra}: {where}"
            recipe = getattr(parsed, "recipe", None)
            if recipe and not recipe.endswith((".yaml", ".yml")):
                assert recipe in recipes, f"no recipe {recipe}: {where}"
            seen += 1
    assert seen >= 30  # the docs show every command; this test must not pass by finding none


def test_doc_python_examples_compile():
    blocks = [(md, code) for md in DOC_FILES for code in _code_blocks(md, langs=("python",))]
    assert len(blocks) >= 8
    for md, code in blocks:
        try:
            compile(code, str(md), "exec")
        except SyntaxError as e:
            pytest.fail(f"{md.relative_to(ROOT)}: a Python example does not compile: {e}")


def _args_entries(doc: str):
    """The parameter names of a Google-style ``Args:`` section (entries at its first indentation)."""
    lines = doc.split("\n")
    if "Args:" not in lines:
        return
    for line in lines[lines.index("Args:") + 1:]:
        if not line.strip():
            return
        m = re.match(r"^    (\S[^:]*?)(\s*\([^)]*\))?:", line)
        if m:
            yield m.group(1)


def test_docstrings_have_one_style():
    """Google-style sections, as mkdocs.yml tells mkdocstrings and CONTRIBUTING tells contributors: no sphinx
    fields, and every ``Args:`` entry names one real parameter."""
    import ast

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # mkdocs' !relative and the like
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    handler = next(p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    assert handler["handlers"]["python"]["options"]["docstring_style"] == "google"
    assert "Google-style" in (ROOT / "CONTRIBUTING.md").read_text()
    bad = []
    for path in sorted((ROOT / "leanvit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node, clean=True) or ""
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            bad += [f"{where}: sphinx field {f}" for f in re.findall(r"^\s*(:(?:param|returns?|raises?)\b)", doc, re.M)]
            fn = node
            if isinstance(node, ast.ClassDef):
                fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if fn is None:
                continue
            a = fn.args
            names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | {x.arg for x in (a.vararg, a.kwarg) if x}
            bad += [f"{where}: Args entry {n!r} is not a parameter" for n in _args_entries(doc) if n not in names]
    assert not bad, bad
