from pathlib import Path

from pydantic import BaseModel

from llmforge.config import Config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name not in ("extra_patterns",):
            out += leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_config_field_is_in_the_readme_reference():
    missing = [f for f in leaf_fields(Config) if f"`{f}`" not in README]
    assert not missing, f"document these in README's Configuration table: {missing}"


def test_readme_shows_the_two_commands():
    assert "make quickstart" in README and "make test" in README
