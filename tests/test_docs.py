"""The YAML in the docs is valid config, the settings reference is the schema's, README stays a short
front page, and every link in the docs leads somewhere."""

import importlib.util
import re
from pathlib import Path
from types import ModuleType

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


def test_routing_doc_rule_example_is_valid_config():
    """The rules example in docs/routing.md (README's before it moved) is a config `check` accepts."""
    block = next(b for b in yaml_blocks(ROOT / "docs" / "routing.md") if "rules:" in b)
    names = [rule.name for rule in parse_config(WEBHOOK + block, "routing.md").policy.rules]
    assert names == ["sales-line", "vip-after-hours", "contacts-before-leads"]


# -- the settings reference: generated from the schema, so no key can be missing or stale --

def settings_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_reference", ROOT / "scripts" / "settings_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_settings_table_is_in_step_with_the_schema():
    reference = settings_reference()
    document = reference.SETTINGS_DOC.read_text(encoding="utf-8")
    assert reference.with_table(document) == document, (
        "docs/settings.md is out of step with the schema: run .venv/bin/python scripts/settings_reference.py")


def test_a_key_missing_from_the_settings_table_is_noticed():
    reference = settings_reference()
    document = reference.SETTINGS_DOC.read_text(encoding="utf-8")
    row = "| `redis.timeout` | `0.1` | over 0, at most 1 seconds |\n"
    assert row in document
    without_a_key = document.replace(row, "")
    assert reference.with_table(without_a_key) == document


def test_the_settings_table_shows_each_declaration():
    table = {key: (default, accepts) for key, default, accepts in settings_reference().rows()}
    assert table["server.listen"][0] == "127.0.0.1:4573"
    assert table["http.listen"][0] == "127.0.0.1:9573"
    assert table["bitrix.deadline"] == ("2", "over 0, at most 30 seconds")
    assert table["bitrix.oauth.token_url"][0] == "https://oauth.bitrix.info/oauth/token/"
    assert table["cache.found_ttl"][1].endswith("(0: off)")
    assert table["redis"] == ("off without the section", "a section")
    assert table["bitrix.webhook_url"][0] == "required"


def test_every_setting_is_explained_beside_the_table():
    reference = settings_reference()
    document = reference.SETTINGS_DOC.read_text(encoding="utf-8")
    before, _, rest = document.partition(reference.BEGIN)
    handwritten = before + rest.partition(reference.END)[2]
    unexplained = [key for key, _, accepts in reference.rows()
                   if accepts != "a section" and key != "routing" and f"`{key}`" not in handwritten]
    assert unexplained == []


# -- README is a newcomer's page; the rest is in docs/, one link away --

def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 350
    assert "```sh\npip install . && agi-bitrix demo\n```" in readme
    assert "```sh\nscripts/test\n```" in readme


def test_readme_links_every_doc():
    linked = {target.split("#")[0] for _, target, _ in links(ROOT / "README.md")}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()


# Written on other branches of issue 22 and linked from here already; checked like any other page
# as soon as it exists.
DOCUMENTS = ["README.md", "README.ru.md", "asterisk-samples/README.md", *sorted(
    str(page.relative_to(ROOT)) for page in (ROOT / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def links(document: Path) -> list[tuple[Path, str, str]]:
    """(document, target as written, target relative to the repository) of each relative link."""
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(document.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, _ = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        found.append((document, target, str(resolved.relative_to(ROOT)) if path else "#"))
    return found


def anchors(document: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code(document.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_links_lead_somewhere(name):
    broken = []
    for document, target, _relative in links(ROOT / name):
        path, _, anchor = target.partition("#")
        page = (document.parent / path).resolve() if path else document
        if not page.exists():
            broken.append(target)
            continue
        if anchor and page.suffix == ".md" and anchor not in anchors(page):
            broken.append(target)
    assert broken == []


# -- docs/security.md: every test it names as holding an attack exists --

SECURITY = ROOT / "docs" / "security.md"
# `tests/…py::name` (a class's test as `tests/…py::Class::name`); a parametrized test may carry its id.
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)+)(?:\[[^\]`]*\])?")


def collected_tests(path: Path) -> set[str]:
    """The tests pytest collects from a file, as `name` or `Class::name`."""
    import ast

    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            found.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"))
    return found


def named_tests(text: str) -> list[tuple[str, str]]:
    return [(path, names[2:]) for path, names in TEST_REFERENCE.findall(text)]


def unknown_tests(text: str) -> list[str]:
    """The `tests/…::name` references in `text` that name no file or no test in it."""
    unknown = []
    for path, name in named_tests(text):
        file = ROOT / path
        if not file.is_file() or name not in collected_tests(file):
            unknown.append(f"{path}::{name}")
    return unknown


def test_every_test_the_security_doc_names_exists():
    text = SECURITY.read_text(encoding="utf-8")
    assert len(named_tests(text)) > 100
    assert unknown_tests(text) == []
    # A shorthand `::name` would leave which file to guess: each reference names its file.
    assert re.findall(r"(?<![\w.])::\w+", text) == []


def test_a_renamed_or_removed_test_is_noticed():
    assert unknown_tests("`tests/test_docs.py::test_every_test_the_security_doc_names_exists`") == []
    assert unknown_tests("`tests/test_docs.py::test_that_was_renamed`, `tests/test_nowhere.py::test_x`") == [
        "tests/test_docs.py::test_that_was_renamed", "tests/test_nowhere.py::test_x"]
    assert unknown_tests("`tests/test_docs.py::test_cookbook_recipes_are_valid_config[some-id]`") == []
