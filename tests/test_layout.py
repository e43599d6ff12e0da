"""The package's layers, as docs/layout.md states them: each part imports only what is below it.

Read from the source with `ast`, so an import that reaches back up fails here, naming the
module and the import, before it makes the next change slow.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agi_bitrix"

# Every part of the package, bottom first, with what it may import from the package besides
# itself: a module, or a subpackage whose modules import each other freely. Each part may import
# only parts listed before it, so the table is the layering (docs/layout.md describes each row);
# a module that no row names fails test_every_module_has_a_row.
LAYERS: dict[str, set[str]] = {
    "agi_bitrix": set(),  # the package itself: __version__
    "agi_bitrix.schema": set(),
    "agi_bitrix.phones": set(),
    "agi_bitrix.background": set(),
    "agi_bitrix.redis_link": set(),
    "agi_bitrix.sansio": set(),
    "agi_bitrix.checking": {"agi_bitrix.schema"},
    "agi_bitrix.agi": {"agi_bitrix.sansio"},
    "agi_bitrix.ami": {"agi_bitrix.schema", "agi_bitrix.background", "agi_bitrix.sansio"},
    "agi_bitrix.bitrix": {"agi_bitrix", "agi_bitrix.schema", "agi_bitrix.phones", "agi_bitrix.background",
                          "agi_bitrix.redis_link"},
    "agi_bitrix.routing": {"agi_bitrix.bitrix.models", "agi_bitrix.phones", "agi_bitrix.checking"},
    "agi_bitrix.dialpolicy": {"agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.phones"},
    "agi_bitrix.callback_settings": {"agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.dialpolicy"},
    "agi_bitrix.callcard_settings": {"agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.redis_link"},
    "agi_bitrix.events_settings": {"agi_bitrix.schema", "agi_bitrix.checking"},
    "agi_bitrix.config": {"agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.phones", "agi_bitrix.bitrix.settings",
                          "agi_bitrix.bitrix.line_settings",
                          "agi_bitrix.routing.compiler", "agi_bitrix.routing.rules",
                          "agi_bitrix.ami.settings", "agi_bitrix.ami.errors", "agi_bitrix.dialpolicy",
                          "agi_bitrix.callback_settings", "agi_bitrix.callcard_settings",
                          "agi_bitrix.events_settings"},
    "agi_bitrix.callcard": {"agi_bitrix.agi", "agi_bitrix.bitrix", "agi_bitrix.config", "agi_bitrix.phones",
                            "agi_bitrix.background", "agi_bitrix.redis_link", "agi_bitrix.callcard_settings"},
    # Click-to-call's flow: the user directory, the outbox and status codes, the dial policy, the name's filter.
    "agi_bitrix.clicktocall": {"agi_bitrix.bitrix", "agi_bitrix.callcard", "agi_bitrix.dialpolicy",
                               "agi_bitrix.routing.variables"},
    "agi_bitrix.callrecord": {"agi_bitrix.bitrix.models", "agi_bitrix.routing.engine"},
    "agi_bitrix.trace": {"agi_bitrix.callrecord"},
    "agi_bitrix.calllog": {"agi_bitrix.config", "agi_bitrix.callrecord"},
    "agi_bitrix.monitoring": {"agi_bitrix.bitrix.errors"},
    "agi_bitrix.server": {"agi_bitrix.agi", "agi_bitrix.config"},
    "agi_bitrix.service": {"agi_bitrix.agi", "agi_bitrix.bitrix.models", "agi_bitrix.phones", "agi_bitrix.routing",
                           "agi_bitrix.config", "agi_bitrix.callrecord", "agi_bitrix.calllog",
                           "agi_bitrix.monitoring"},
    # Callback requests' flow: routed by the Router's decision, dialled like a click, finished through the outbox.
    "agi_bitrix.callback": {"agi_bitrix.ami.protocol", "agi_bitrix.bitrix.users", "agi_bitrix.callback_settings",
                            "agi_bitrix.callcard",
                            "agi_bitrix.callrecord", "agi_bitrix.clicktocall", "agi_bitrix.config",
                            "agi_bitrix.dialpolicy", "agi_bitrix.phones", "agi_bitrix.routing.engine"},
    # The admin page: the running parts' state through the Router it is handed, the recent calls'
    # records, their trace as `agi-bitrix route` prints it, and the rules as the admin wrote them.
    "agi_bitrix.web": {"agi_bitrix", "agi_bitrix.bitrix.client", "agi_bitrix.routing.rules", "agi_bitrix.config",
                       "agi_bitrix.callrecord", "agi_bitrix.trace", "agi_bitrix.calllog", "agi_bitrix.service"},
    # The one HTTP listener: /metrics, /healthz, and what the Application hands it (admin page, install callback).
    # Click-to-call as one running part: the AMI client, the events' receiver or poller, the flow.
    "agi_bitrix.clicktocall_service": {"agi_bitrix.ami", "agi_bitrix.bitrix", "agi_bitrix.clicktocall",
                                       "agi_bitrix.config", "agi_bitrix.callback", "agi_bitrix.callcard.holders",
                                       "agi_bitrix.callcard.register", "agi_bitrix.service"},
    "agi_bitrix.http_listener": {"agi_bitrix.config", "agi_bitrix.monitoring"},
    # The /healthz body, from the parts' own state: the lookup memory, the tokens, the outbox.
    "agi_bitrix.health": {"agi_bitrix", "agi_bitrix.bitrix.memory", "agi_bitrix.bitrix.oauth",
                          "agi_bitrix.bitrix.users", "agi_bitrix.callcard.finish", "agi_bitrix.callcard.outbox",
                          "agi_bitrix.config", "agi_bitrix.monitoring"},
    "agi_bitrix.app": {"agi_bitrix", "agi_bitrix.schema", "agi_bitrix.checking", "agi_bitrix.bitrix",
                       "agi_bitrix.config", "agi_bitrix.callcard", "agi_bitrix.calllog", "agi_bitrix.monitoring",
                       "agi_bitrix.server", "agi_bitrix.service", "agi_bitrix.web", "agi_bitrix.http_listener",
                       "agi_bitrix.clicktocall_service", "agi_bitrix.health"},
    "agi_bitrix.explain": {"agi_bitrix.bitrix", "agi_bitrix.config", "agi_bitrix.service", "agi_bitrix.trace"},
    "agi_bitrix.ruletest": {"agi_bitrix.bitrix.models", "agi_bitrix.checking", "agi_bitrix.routing",
                            "agi_bitrix.config", "agi_bitrix.service"},
    "agi_bitrix.oauthlogin": {"agi_bitrix.bitrix", "agi_bitrix.config"},
    "agi_bitrix.eventscli": {"agi_bitrix.bitrix", "agi_bitrix.config"},
    "agi_bitrix.testing": set(),  # stand-ins for the portal and the PBX; nothing of the product
    "agi_bitrix.demo": {"agi_bitrix.config", "agi_bitrix.app", "agi_bitrix.testing"},
    "agi_bitrix.cli": {"agi_bitrix", "agi_bitrix.checking", "agi_bitrix.bitrix.oauth", "agi_bitrix.config",
                       "agi_bitrix.dialpolicy", "agi_bitrix.callcard.outbox", "agi_bitrix.app", "agi_bitrix.explain",
                       "agi_bitrix.ruletest", "agi_bitrix.oauthlogin", "agi_bitrix.eventscli", "agi_bitrix.demo",
                       "agi_bitrix.bitrix.lines"},
    "agi_bitrix.__main__": {"agi_bitrix.cli"},
}
# The call-card AGI scripts share what they check alike through callcard/identity.py, not each other.
CALLCARD_SCRIPTS = {"agi_bitrix.callcard.register", "agi_bitrix.callcard.cards", "agi_bitrix.callcard.finish"}
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
                    "agi_bitrix.callcard_settings"}


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
    """Whether `name` is the part or one of its modules; the package's root part is its __init__
    alone (importing `agi_bitrix` for __version__ allows nothing else)."""
    return name == part or (part != "agi_bitrix" and name.startswith(part + "."))


def layer_of(module: str) -> str | None:
    """The row of LAYERS `module` belongs to: its own, or its subpackage's (the package's root
    row holds the package's __init__ alone)."""
    rows = [row for row in LAYERS if within(module, row)]
    return max(rows, key=len) if rows else None


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_row():
    assert [module for module in modules() if layer_of(module) is None] == []


def test_every_row_names_a_module_and_imports_only_rows_above_it_in_the_table():
    wrong = []
    for index, (row, allowed) in enumerate(LAYERS.items()):
        if not any(layer_of(module) == row for module in modules()):
            wrong.append(f"{row}: no such module")
        below = list(LAYERS)[:index]
        wrong.extend(f"{row} may import {name}, which is not below it" for name in sorted(allowed)
                     if layer_of(name) not in below)
    assert wrong == []


def test_every_part_imports_only_what_is_below_it():
    wrong = []
    for module, path in modules().items():
        part = layer_of(module)
        if part is None:
            continue  # test_every_module_has_a_row names it
        wrong.extend(f"{module} imports {name}" for name in sorted(package_imports(path))
                     if not within(name, part) and not any(within(name, a) for a in LAYERS[part]))
    assert wrong == []


def test_the_call_card_scripts_import_none_of_each_other():
    paths = modules()
    assert [f"{script} imports {name}" for script in sorted(CALLCARD_SCRIPTS)
            for name in sorted(package_imports(paths[script])) if name in CALLCARD_SCRIPTS] == []


def test_the_layout_document_describes_every_row():
    text = (PACKAGE.parent / "docs" / "layout.md").read_text(encoding="utf-8")
    shown = []
    for row in LAYERS:
        path = row.replace(".", "/")
        if row == "agi_bitrix":
            shown.append("`agi_bitrix/__init__.py`")
        else:
            shown.append(f"`{path}/`" if (PACKAGE.parent / path).is_dir() else f"`{path}.py`")
    assert [where for where in shown if where not in text] == []


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
