"""The YAML in the docs is valid config, and the README's claims about commands hold."""

import re
from pathlib import Path

import pytest

from agi_bitrix.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
COOKBOOK = ROOT / "docs" / "cookbook.md"
WEBHOOK = 'bitrix: {webhook_url: "https://portal.example/rest/1/code/"}\n'


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("block", yaml_blocks(COOKBOOK), ids=lambda b: b.split("name: ")[1].split("\n")[0])
def test_cookbook_recipes_are_valid_config(block):
    config = parse_config(WEBHOOK + block, "cookbook")
    assert config.policy.rules


def test_readme_rule_example_is_valid_config():
    block = next(b for b in yaml_blocks(ROOT / "README.md") if "rules:" in b)
    names = [rule.name for rule in parse_config(WEBHOOK + block, "README").policy.rules]
    assert names == ["sales-line", "vip-after-hours", "contacts-before-leads"]
