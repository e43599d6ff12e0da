"""The package's layers, as README's "Layout" states them: each part imports only what is below it.

Read from the source with `ast`, so an import that reaches back up fails here, naming the
module and the import, before it makes the next change slow.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agi_bitrix"

# What each part may import from the package besides itself. The top (app, cli, service, server,
# explain, ruletest, demo, monitoring, calllog, config) is not listed: it wires the parts together.
MAY_IMPORT = {
    "agi_bitrix.schema": set(),
    "agi_bitrix.phones": set(),
    "agi_bitrix.background": set(),
    "agi_bitrix.redis_link": set(),
    "agi_bitrix.checking": {"agi_bitrix.schema"},
    "agi_bitrix.agi": set(),
    "agi_bitrix.bitrix": {"agi_bitrix", "agi_bitrix.schema", "agi_bitrix.phones", "agi_bitrix.background",
                          "agi_bitrix.redis_link"},
    "agi_bitrix.routing": {"agi_bitrix.bitrix.models", "agi_bitrix.phones", "agi_bitrix.checking"},
    "agi_bitrix.callcard": {"agi_bitrix.agi", "agi_bitrix.bitrix", "agi_bitrix.config", "agi_bitrix.phones",
                            "agi_bitrix.background", "agi_bitrix.redis_link"},
    "agi_bitrix.testing": set(),
    # The admin page reads what the running parts hold and explains calls as `agi-bitrix route` does.
    "agi_bitrix.web": {"agi_bitrix", "agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.phones",
                       "agi_bitrix.background", "agi_bitrix.agi", "agi_bitrix.bitrix", "agi_bitrix.routing",
                       "agi_bitrix.callcard", "agi_bitrix.config", "agi_bitrix.service", "agi_bitrix.server",
                       "agi_bitrix.monitoring", "agi_bitrix.calllog", "agi_bitrix.explain"},
}
# Stand-ins for Portal and PBX: only the demo (and the tests and benchmarks) may use them.
TESTING_USERS = {"agi_bitrix.demo"}
# The admin page is wired in by the Application alone; nothing it reads may import it back.
WEB_USERS = {"agi_bitrix.app"}
# Redis is reached through one link (its URL parser and redactor, its client policy, its health):
# the shared state and the Redis outbox connect through it, everything else sees their narrow
# interfaces (RequestBudget, OperatingBudget, CircuitBreaker, SharedAnswers, OutboxStore) and
# works the same without it.
REDIS_USERS = {"agi_bitrix.redis_link"}
# Who connects through the link.
REDIS_LINK_USERS = {"agi_bitrix.bitrix.shared", "agi_bitrix.callcard.redis_outbox", "agi_bitrix.bitrix.settings",
                    "agi_bitrix.config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agi_bitrix":  # `from agi_bitrix import background` names a module
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                    imported.add(f"agi_bitrix.{alias.name}" if is_module else "agi_bitrix")
            else:
                imported.add(node.module)
    return {name for name in imported if name == "agi_bitrix" or name.startswith("agi_bitrix.")}


def within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def test_every_part_imports_only_what_is_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        part = next((p for p in MAY_IMPORT if within(module, p)), None)
        if part is not None:
            wrong.extend(f"{module} imports {name}" for name in sorted(package_imports(path))
                         if not within(name, part) and not any(within(name, a) for a in MAY_IMPORT[part]))
    assert wrong == []


def test_only_the_demo_uses_the_stand_ins():
    users = {module_name(path) for path in PACKAGE.rglob("*.py")
             if not within(module_name(path), "agi_bitrix.testing")
             and any(within(name, "agi_bitrix.testing") for name in package_imports(path))}
    assert users == TESTING_USERS


def test_only_the_application_imports_the_admin_page():
    users = {module_name(path) for path in PACKAGE.rglob("*.py")
             if not within(module_name(path), "agi_bitrix.web")
             and any(within(name, "agi_bitrix.web") for name in package_imports(path))}
    assert users == WEB_USERS


def test_only_the_shared_state_talks_to_redis():
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(name == "redis" or name.startswith("redis.") for name in names):
                users.add(module_name(path))
    assert users == REDIS_USERS


def test_only_the_shared_state_the_outbox_and_the_url_check_use_the_redis_link():
    users = {module_name(path) for path in PACKAGE.rglob("*.py")
             if "agi_bitrix.redis_link" in package_imports(path)}
    assert users == REDIS_LINK_USERS


def test_both_forms_of_import_are_seen(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("from agi_bitrix.config import Config\nfrom agi_bitrix import monitoring, __version__\n"
                      "import agi_bitrix.server\nimport json\n")
    assert package_imports(source) == {"agi_bitrix.config", "agi_bitrix.monitoring", "agi_bitrix",
                                       "agi_bitrix.server"}
