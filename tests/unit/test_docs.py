"""The README is a short front door, docs/ holds the rest, and the configuration reference is generated."""

import re
from pathlib import Path

from pydantic import BaseModel

from llmforge.config import Config, reference_markdown

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_configuration_reference_is_generated_from_the_models():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), "docs/configuration.md is stale: run `make docs` and commit it"


def test_every_config_field_has_a_row_and_a_description():
    reference = reference_markdown()
    missing = [f for f in leaf_fields(Config) if f"| `{f}` |" not in reference]
    assert not missing, f"fields without a row in the reference: {missing}"
    undocumented = re.findall(r"^\| `([\w.]+)` \|[^\n]*\|\s*\|$", reference, re.M)
    assert not undocumented, f"fields without a description: {undocumented}"


def test_readme_is_a_short_front_door_with_the_two_commands():
    assert len(README.splitlines()) <= 200, "README.md is for newcomers; move detail into docs/"
    assert "make quickstart" in README and "make test" in README
    for page in ("data", "training", "post-training", "serving", "deployment", "configuration", "benchmarks"):
        assert f"docs/{page}.md" in README, f"README.md does not link docs/{page}.md"


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [REPO / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
