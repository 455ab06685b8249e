"""The documentation against the code: docs/config.md is generated from climseg/config.py and
the descriptions in climseg/config_doc.py, and the Markdown pages' links lead somewhere."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from climseg import config_doc
from climseg.config import Config

REPO = Path(__file__).resolve().parent.parent
REGENERATE = f"run `make docs` ({config_doc.GENERATOR})"


def test_every_config_key_has_a_description_and_every_description_a_key():
    found = config_doc.problems()
    assert not found, ("climseg/config_doc.py and climseg/config.py disagree; add or remove "
                       "entries of DESCRIPTIONS/SECTIONS, then " + REGENERATE + ":\n  "
                       + "\n  ".join(found))


def test_config_md_is_the_generated_page():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == config_doc.render(), f"docs/config.md is out of date: {REGENERATE}"


def test_config_md_lists_every_key_with_its_default():
    page = (REPO / "docs" / "config.md").read_text()
    keys = list(config_doc.config_keys())
    assert len(keys) > 40
    assert ("| `optimizer.eps` | float | `1.0e-06` |" in page
            and "| `train.batchnorm_group_size` | int or null | `1` |" in page
            and "| `data.crop` | list of int or null | `null` |" in page)
    missing = [key for key, _, _ in keys if f"| `{key}` |" not in page]
    assert not missing, f"docs/config.md does not list {missing}: {REGENERATE}"


# A config tree with one key more and one less than the descriptions know, to show the checks
# can fail, and say what to do.
@dataclasses.dataclass
class _Dist:
    engine: str = "horovod"


@dataclasses.dataclass
class _Tree:
    seed: int = 1
    dist: _Dist = dataclasses.field(default_factory=_Dist)


def test_problems_name_undescribed_and_unknown_keys():
    descriptions = {"seed": "the seed", "output_dir": "gone", "dist.other": "names `dist.nope`"}
    found = config_doc.problems(_Tree, descriptions, {"": "top", "data": "gone"})
    assert found == [
        "dist.engine: no description",
        "dist: section has no line in SECTIONS",
        "output_dir: described, but config.py has no such key",
        "dist.other: described, but config.py has no such key",
        "data: in SECTIONS, but config.py has no such section",
        "dist.other: the description names `dist.nope`, which config.py does not have",
    ]
    with pytest.raises(ValueError, match="6 problem"):
        config_doc.render(_Tree, descriptions, {"": "top", "data": "gone"})


def test_render_of_a_small_tree():
    text = config_doc.render(_Tree, {"seed": "the | seed", "dist.engine": "which engine"},
                             {"": "Top.", "dist": "Distribution."})
    assert text.startswith(config_doc.PREAMBLE)
    assert text.endswith(
        "## Top level\n\nTop.\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n"
        "| `seed` | int | `1` | the \\| seed |\n\n"
        "## `dist`\n\nDistribution.\n\n| key | type | default | meaning |\n"
        "| --- | --- | --- | --- |\n| `dist.engine` | string | `horovod` | which engine |\n")


def test_generator_command_writes_the_page_and_rejects_a_bad_output(tmp_path):
    out = tmp_path / "config.md"
    result = subprocess.run([sys.executable, "-m", "climseg.config_doc", "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == config_doc.render()
    bad = tmp_path / "no-such-folder" / "config.md"
    result = subprocess.run([sys.executable, "-m", "climseg.config_doc", "--output", str(bad)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m climseg.config_doc: error: {bad}: No such file or directory"]


def test_config_keys_walk_the_dataclasses():
    keys = {key for key, _, _ in config_doc.config_keys(Config)}
    sections = [s for s in config_doc.sections(Config) if s]
    assert {"output_dir", "data.root", "train.elastic"} <= keys
    assert all(key.partition(".")[0] in sections for key in keys if "." in key)
    assert not set(sections) & keys


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_pages_lead_somewhere():
    broken = []
    for page in _pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_stays_short_and_points_to_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_scaling_tables_are_the_models_output():
    """docs/scaling.md holds what tools/scaling_model.py prints, table for table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_model",
                                                  REPO / "tools" / "scaling_model.py")
    model = importlib.util.module_from_spec(spec)
    sys.modules["scaling_model"] = model  # dataclasses look their module up there
    spec.loader.exec_module(model)
    assert model.report() in (REPO / "docs" / "scaling.md").read_text()
