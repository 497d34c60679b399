"""The docs site builds with `mkdocs build --strict`, and a broken link or a page missing from the nav fails it.

mkdocs.yml turns every warning into an error (`strict: true`, and `validation:` makes broken links,
broken anchors and pages left out of the nav warnings), so these tests only need the exit status.
About 6 seconds a build: the notebooks are rendered from their committed outputs, not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def nav_pages() -> list[str]:
    """Every page the nav of mkdocs.yml names (`Title: page.md` or `.ipynb` lines)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s*(\S+\.(?:md|ipynb))\s*$", nav, re.M)


def test_every_page_is_built(site):
    pages = nav_pages()
    assert "index.md" in pages and "api.md" in pages and "notebooks/quickstart.ipynb" in pages
    for page in pages:
        name = page.rsplit(".", 1)[0]
        built = site / "index.html" if name == "index" else site / name / "index.html"
        assert built.is_file(), f"{page} was not built"


def test_api_reference_comes_from_the_docstrings(site):
    api = (site / "api" / "index.html").read_text()
    for name in ("LatentDiffusionPipeline", "PipelineOutput", "Recipe", "read_recipe", "read_recipes", "load_image",
                 "make_grid", "Clip", "NonFiniteError", "ModelFileError", "ModelNotFoundError"):
        assert f'id="ldm_pipeline.{name}"' in api, name
    assert 'id="ldm_pipeline.LatentDiffusionPipeline.from_pretrained"' in api
    assert 'id="ldm_pipeline.LatentDiffusionPipeline.enable_vae_tiling"' in api  # inherited helpers are listed


def test_notebooks_are_rendered_with_their_outputs(site):
    for name in ("quickstart", "image_to_image", "inside_the_loop", "train_your_own"):
        page = (site / "notebooks" / name / "index.html").read_text()
        assert "data:image/png;base64" in page, f"{name}: no committed image output on the page"
    # the notebooks are read from notebooks/, never copied into docs/
    assert not list((ROOT / "docs").rglob("*.ipynb"))


def test_a_broken_link_or_an_unlisted_page_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "notebooks", copy / "notebooks", ignore=shutil.ignore_patterns("*.py"))
    (copy / "ldm_pipeline").symlink_to(ROOT / "ldm_pipeline", target_is_directory=True)
    with (copy / "docs" / "cli.md").open("a") as f:
        f.write("\nSee [the missing page](missing.md) and [no such section](speed.md#no-such-section).\n")
    (copy / "docs" / "unlisted.md").write_text("# A page the nav does not name\n")
    result = build(copy / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "missing.md" in output and "no-such-section" in output and "unlisted.md" in output, output


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#", 1)[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert local, "the README links no docs page"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
