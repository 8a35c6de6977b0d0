"""The README front page and the documentation pages: their generated
blocks are what the results files say, their links resolve, and the README
stays a front page a user reads in one sitting."""

import importlib.util
import os
import re

import pytest
from paths import ROOT


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


update_readme = _module("benchmarks/update_readme.py", "update_readme_for_docs")


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _nav_pages():
    """The page files named in mkdocs.yml's nav."""
    return re.findall(r"^\s+- [^:]+: ([\w-]+\.md)$", _read("mkdocs.yml"), re.M)


def test_readme_is_a_short_front_page():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    # The two-command quick start: install and run the main example; the tests.
    assert 'pip install -e ".[test]" && python examples/quickstart.py --epochs 20' in text
    assert "bash .ci/run" in text
    for word in ("issue", "requirement", "PASS"):
        assert not re.search(rf"\b{word}\b", text), word


@pytest.mark.parametrize(
    "path",
    ["README.md"]
    + [f"docs/{p}" for p in sorted(os.listdir(os.path.join(ROOT, "docs"))) if p.endswith(".md")],
)
def test_generated_blocks_are_up_to_date_and_not_empty(path):
    text = _read(path)
    assert update_readme.filled(text) == text, (
        f"{path} differs from the results files: run python -m benchmarks.update_readme"
    )
    for name in re.findall(r"<!-- (\w+) -->", text):
        body = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S).group(1)
        assert body.strip(), f"block {name} of {path} is empty"
        assert name in update_readme.BLOCKS


def test_links_resolve():
    pages = _nav_pages()
    generated = {"index.md", "changelog.md"}  # docs/hooks.py makes them
    assert generated <= set(pages)
    for page in set(pages) - generated:
        assert os.path.isfile(os.path.join(ROOT, "docs", page)), page
    # Every page in docs/ is in the nav, and every relative link of the README
    # and the pages points at a file that exists.
    assert {p for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md")} == (
        set(pages) - generated
    )
    for path in ["README.md"] + [f"docs/{p}" for p in set(pages) - generated]:
        base = os.path.dirname(os.path.join(ROOT, path))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[\w-]*)?\)", _read(path)):
            if target.startswith(("http://", "https://")):
                continue
            where = os.path.join(ROOT if target.startswith("benchmarks/") else base, target)
            assert os.path.exists(where), f"{path} links to {target}, which does not exist"


def test_docs_hook_makes_the_home_page_from_the_readme():
    pytest.importorskip("mkdocs")
    hooks = _module("docs/hooks.py", "docs_hooks")
    home = hooks.index_markdown(_read("README.md"))
    assert "](docs/" not in home and "](guide.md)" in home and "](changelog.md)" in home
    assert "(LICENSE)" not in home


def test_version_has_one_source():
    import keras_sam

    setup = _read("setup.cfg")
    assert "version = attr: keras_sam.__version__" in setup
    assert re.search(r"^version\s*=\s*\d", setup, re.M) is None
    assert f"## {keras_sam.__version__} " in _read("CHANGELOG.md")
    assert "Apache License" in _read("LICENSE") and "license = Apache-2.0" in setup


def test_every_test_module_sits_in_a_folder_of_its_kind():
    # The marks come from the folders (tests/conftest.py): a module outside
    # them would fall out of, or into, CI's Keras 3.12 leg silently.
    import conftest

    tests = os.path.join(ROOT, "tests")
    modules = {}
    for folder, _, files in os.walk(tests):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                modules[name] = os.path.basename(folder)
    assert set(modules.values()) == set(conftest.KINDS)
    assert set(conftest.SLOWEST_FIRST) <= set(modules)
    assert len(set(conftest.SLOWEST_FIRST)) == len(conftest.SLOWEST_FIRST)
    assert 'not tooling and not cross_backend"' in _read(".ci/run")
    # CI hands modules out in SLOWEST_FIRST's order, not xdist's own.
    assert _read(".ci/run").count("--dist loadfile --no-loadscope-reorder") == 2


# ------------------------------------------------- the built site, as seen
def _visible_text(html):
    """The text a reader sees on a built page: no code blocks, no tags."""
    html = re.sub(r"<(pre|code|script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"<[^>]+>", "\n", html)


def test_the_built_pages_hold_no_raw_markdown_table(tmp_path):
    pytest.importorskip("mkdocs")
    import subprocess
    import sys

    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(site)],
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > len(_nav_pages())  # every page of the nav, and 404
    for page in pages:
        text = _visible_text(page.read_text(encoding="utf-8"))
        raw = [line for line in text.splitlines() if re.match(r"\s*\|.*\|\s*$", line)]
        assert not raw, f"{page.relative_to(site)}: table rows rendered as text: {raw[:2]}"


def test_a_table_after_a_list_item_is_set_apart_when_blocks_are_filled():
    text = update_readme.from_markdown(os.path.join("lora_study", "results.md"))()
    assert re.search(r"^- verdict.*\n\n\| method \|", text, re.M)


def test_every_install_line_works_from_a_clone():
    """keras_sam is installed from its source tree (`pip install .`,
    `".[extra]"`), not by a name pip would look up on an index."""
    pages = ["README.md"] + [f"docs/{p}" for p in os.listdir(os.path.join(ROOT, "docs"))]
    lines = [
        (page, line)
        for page in pages
        if page.endswith(".md")
        for line in _read(page).splitlines()
        if "pip install" in line
    ]
    assert lines
    for page, line in lines:
        assert not re.search(r"pip install[^#]*\bkeras[_-]sam\b", line), f"{page}: {line}"


def test_what_the_example_and_a_docs_build_write_is_ignored_by_git():
    """`git status` stays clean after `mkdocs build` (site/) and
    examples/fine_tune_lora.py (fine_tune_lora_out/, its default --out)."""
    import subprocess

    example = _read("examples/fine_tune_lora.py")
    assert 'p.add_argument("--out", default="fine_tune_lora_out")' in example
    assert "site_dir" not in _read("mkdocs.yml")  # MkDocs' default: site/
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    for path in ("site/index.html", "fine_tune_lora_out/fine_tuned.weights.h5"):
        proc = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=60
        )
        assert proc.returncode == 0, f"{path} is not ignored by .gitignore"
