"""The documentation site builds: `mkdocs build --strict` fails on a link to a missing page or anchor, a page left
out of the navigation, or any other warning (mkdocs.yml's `validation` section). And the README's status table is
the home page's, so the front page and the site never tell two stories."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


ENV = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's banner about its successor, not a warning


def _mkdocs_or_skip():
    try:
        import material  # noqa: F401  (mkdocs-material: the theme mkdocs.yml names)
        import mkdocs  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mkdocs or mkdocs-material is not installed ({e.name}); the dev extra installs both: "
                    f"pip install -e '.[dev,cpu]'")


def test_site_builds_strict(tmp_path):
    _mkdocs_or_skip()
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(site)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("index.html", "quickstart/index.html", "commands/fa-train/index.html",
                 "commands/fa-export/index.html", "commands/fa-bench/index.html", "commands/fa-predict/index.html",
                 "results/index.html", "licenses/index.html", "replicate_tradeoff.png", "replicate_small.json"):
        assert (site / page).is_file(), page


def test_strict_build_catches_a_broken_link(tmp_path):
    """The check above can fail: the same site with one link pointing at a page that does not exist is refused."""
    _mkdocs_or_skip()
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [a page that is not there](no-such-page.md).\n")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no-such-page.md" in r.stdout + r.stderr, r.stdout + r.stderr


def _status_table(text):
    start = text.index("| part | state |")
    table = text[start:text.index("\n\n", start)]
    return re.sub(r"\]\(docs/", "](", table)  # the README links into docs/, the site from inside it


def test_readme_status_table_is_the_sites():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "index.md")) as f:
        index = f.read()
    assert _status_table(readme) == _status_table(index)
