"""Docs and README stay true to the code: every config key is documented, shown configs load."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stackwise.cli.plan import plan_rows
from stackwise.config import LrSchedule, Ramp, StackWiseConfig

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        nested = [a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                  if isinstance(a, type) and issubclass(a, BaseModel) and a not in (Ramp, LrSchedule)]
        if nested and key != "schedule":
            keys += leaf_keys(nested[0], f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("section", ["model", "training", "data", "run"])
def test_every_config_key_is_documented(section):
    text = (ROOT / "docs" / "config.md").read_text()
    model = StackWiseConfig.model_fields[section].annotation
    for key in leaf_keys(model):
        assert f"`{key}`" in text, f"docs/config.md does not document {section}.{key}"


def test_every_phase_key_is_documented():
    from stackwise.config import PhaseConfig, PhaseModelConfig

    text = (ROOT / "docs" / "config.md").read_text()
    for key in [f.alias or n for n, f in PhaseConfig.model_fields.items()] + list(PhaseModelConfig.model_fields):
        assert f"`{key}`" in text, key


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("---")[0]
    assert "make demo" in head and "make test" in head


def test_readme_config_loads_and_plans():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        config = StackWiseConfig.from_dict(yaml.safe_load(block))
        assert plan_rows(config, config.training.total_steps or 100)


def test_the_growing_by_hand_example_runs_as_written(tmp_path, monkeypatch):
    """docs/training.md, "Growing by hand and the front door": the snippet runs as printed (its
    run directory goes under the current folder)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), flags=re.S)
    snippet = next(b for b in blocks if "ProgressiveRackBuilder(config)" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "docs/training.md", "exec"), namespace)  # the project's own docs
    assert len(namespace["builder"].rack) == 4 and namespace["result"].steps == 12
