"""Mutation testing of the modules that decide what reaches Asterisk (run it as `scripts/mutation`).

Each mutant changes one thing in one module (an operator, a comparison, a constant, a string,
a condition, a statement, a regex method, any/all, min/max) and the module's own test files run
against it; a mutant that no test notices is a rule the tests do not pin down. The mutator is
this file, not mutmut or cosmic-ray: mutmut 3 leaves decorated functions (every lru_cache'd
function here) and module constants (every named limit) alone, and cosmic-ray has no string,
statement-deletion or regex-method operators and writes mutants into the working tree, so two
workers need two copies of the repository.

How it runs: one parent imports pytest and every third-party module the tests need, then forks
a child per mutant (two at a time by default). The child puts the mutated module in front of
the real one with an import hook and runs pytest on the module's test files, stopping at the
first failure; its exit status says killed (non-zero, or over the time limit) or survived (0).

Survivors that no test can kill are listed with a reason in scripts/mutation-equivalents.txt,
one per line: `<mutant id> -- <why no behaviour changes>`. The score is killed over mutants
that are not listed there. Listed ids that no longer exist or that are killed are reported, so
the list does not rot.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.abc
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "scripts" / "mutation-equivalents.txt"

# Module -> the test files that pin it down (non-Asterisk, seconds to run).
MODULES: dict[str, tuple[str, ...]] = {
    "agi_bitrix/agi/quoting.py": ("tests/test_quoting.py",),
    "agi_bitrix/agi/protocol.py": ("tests/test_agi_protocol.py",),
    "agi_bitrix/phones.py": ("tests/test_phones.py",),
    "agi_bitrix/routing/engine.py": ("tests/test_routing.py",),
}
REQUIRED_SCORE = 95.0

_COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_BINOP_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr,
}
_METHOD_SWAPS = {"fullmatch": ("match", "search"), "match": ("fullmatch", "search"), "search": ("match", "fullmatch")}
_FUNCTION_SWAPS = {"any": "all", "all": "any", "min": "max", "max": "min"}
_SYMBOLS = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
    ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
    ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.BitOr: "|", ast.BitAnd: "&",
}


@dataclass
class Mutant:
    id: str
    line: int
    apply: Callable[[], None]  # changes the tree it was found in


@dataclass
class _Finder:
    """Walks one module's tree and lists its mutants in a fixed order (the child finds the same)."""

    module: str
    mutants: list[Mutant] = field(default_factory=list)
    _scope: list[str] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)

    def add(self, node: ast.AST, what: str, apply: Callable[[], None]) -> None:
        scope = ".".join(self._scope) or "<module>"
        base = f"{self.module}::{scope}::{what}"
        count = self._seen[base] = self._seen.get(base, 0) + 1
        self.mutants.append(Mutant(base if count == 1 else f"{base} #{count}", getattr(node, "lineno", 0), apply))

    def replace(self, holder: ast.AST, name: str, index: int | None, new: ast.AST, what: str) -> None:
        old = getattr(holder, name) if index is None else getattr(holder, name)[index]

        def apply() -> None:
            ast.copy_location(new, old)
            if index is None:
                setattr(holder, name, new)
            else:
                getattr(holder, name)[index] = new

        self.add(old, what, apply)

    # -- the walk --------------------------------------------------------------------------

    def walk(self, node: ast.AST, in_function: bool = False) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # Decorators (cache sizes) and annotations are not behaviour; the body is.
            self._scope.append(node.name)
            self.body(node, "body", in_function=not isinstance(node, ast.ClassDef))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for index, default in enumerate(node.args.defaults):
                    self.expression_tree(node.args, "defaults", index, default)
            self._scope.pop()
            return
        if isinstance(node, ast.Module):
            self.body(node, "body", in_function=False)
            return
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                if value and isinstance(value[0], ast.stmt):
                    self.body(node, name, in_function)
                else:
                    for index, item in enumerate(value):
                        if isinstance(item, ast.AST):
                            self.walk_child(node, name, index, item, in_function)
            elif isinstance(value, ast.AST):
                self.walk_child(node, name, None, value, in_function)

    def walk_child(self, holder: ast.AST, name: str, index: int | None, node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.expr):
            self.expression_tree(holder, name, index, node)
        elif isinstance(node, ast.excepthandler):
            self.body(node, "body", in_function)
        else:
            self.walk(node, in_function)

    def body(self, holder: ast.AST, name: str, in_function: bool) -> None:
        statements = getattr(holder, name)
        for index, statement in enumerate(statements):
            if index == 0 and _is_docstring(statement):
                continue
            if isinstance(statement, ast.AnnAssign):
                if _is_type_alias(statement):
                    continue
                if statement.value is not None:
                    self.expression_tree(statement, "value", None, statement.value)
                continue
            if in_function and not isinstance(statement, (ast.Pass, ast.FunctionDef, ast.ClassDef)):
                self.replace(holder, name, index, ast.Pass(), f"delete `{_short(statement)}`")
            if isinstance(statement, (ast.If, ast.While)):
                self.negate(statement, "test")
            if isinstance(statement, ast.AugAssign) and type(statement.op) in _BINOP_SWAPS:
                swapped = copy.deepcopy(statement)
                swapped.op = _BINOP_SWAPS[type(statement.op)]()
                self.replace(holder, name, index, swapped,
                             f"`{_short(statement)}`: {_SYMBOLS[type(statement.op)]}= -> "
                             f"{_SYMBOLS[type(swapped.op)]}=")
            self.walk(statement, in_function)

    def negate(self, holder: ast.If | ast.While | ast.IfExp, name: str) -> None:
        test = getattr(holder, name)
        self.replace(holder, name, None, ast.UnaryOp(ast.Not(), test), f"`{_short(test)}` -> not")

    def expression_tree(self, holder: ast.AST, name: str, index: int | None, root: ast.expr) -> None:
        """Every mutation inside one expression (held in holder.name[index]), parents before children."""
        for parts in list(_children(holder, name, index, root)):
            self.expression(*parts)

    def expression(self, holder: ast.AST, name: str, index: int | None, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            for new, what in _constant_mutations(node.value):
                self.in_place(node, {"value": new}, f"{_short(node)} -> {what}")
        elif isinstance(node, ast.JoinedStr):
            # An f-string's wording is not a rule; whether its text matters at all is.
            self.in_place(node, {"values": [ast.Constant("")]}, f"f-string `{_short(node)[:40]}` -> ''")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
            new_op = _BINOP_SWAPS[type(node.op)]()
            self.in_place(node, {"op": new_op}, f"`{_short(node)}`: {_SYMBOLS[type(node.op)]} -> "
                                                f"{_SYMBOLS[type(new_op)]}")
        elif isinstance(node, ast.BoolOp):
            new_bool = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self.in_place(node, {"op": new_bool}, f"`{_short(node)}`: {type(node.op).__name__.lower()} -> "
                                                  f"{type(new_bool).__name__.lower()}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self.replace(holder, name, index, node.operand, f"`{_short(node)}` -> drop not")
        elif isinstance(node, ast.Compare):
            for position, op in enumerate(node.ops):
                if type(op) in _COMPARE_SWAPS:
                    ops = list(node.ops)
                    ops[position] = _COMPARE_SWAPS[type(op)]()
                    self.in_place(node, {"ops": ops}, f"`{_short(node)}`: {_SYMBOLS[type(op)]} -> "
                                                      f"{_SYMBOLS[type(ops[position])]}")
        elif isinstance(node, ast.IfExp):
            self.in_place(node, {"test": ast.UnaryOp(ast.Not(), node.test)}, f"`{_short(node.test)}` -> not")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _METHOD_SWAPS:
                for other in _METHOD_SWAPS[func.attr]:
                    self.in_place(func, {"attr": other}, f"`{_short(node)[:50]}`: {func.attr} -> {other}")
            elif isinstance(func, ast.Name) and func.id in _FUNCTION_SWAPS:
                other = _FUNCTION_SWAPS[func.id]
                self.in_place(func, {"id": other}, f"`{_short(node)[:50]}`: {func.id} -> {other}")

    def in_place(self, node: ast.AST, changes: dict[str, object], what: str) -> None:
        """A mutant that sets fields of `node` itself (so no parent is needed)."""

        def apply() -> None:
            for key, value in changes.items():
                setattr(node, key, value)
            ast.fix_missing_locations(node)

        self.add(node, what, apply)


def _children(holder: ast.AST, name: str, index: int | None, node: ast.AST
              ) -> Iterator[tuple[ast.AST, str, int | None, ast.AST]]:
    """The expression `node` (held in holder.name[index]) and every expression inside it."""
    yield holder, name, index, node
    if isinstance(node, ast.JoinedStr):
        return  # its parts are wording (see expression())
    for child_name, value in ast.iter_fields(node):
        if isinstance(value, list):
            for child_index, item in enumerate(value):
                if isinstance(item, ast.expr):
                    yield from _children(node, child_name, child_index, item)
                elif isinstance(item, ast.comprehension):
                    for part in ("target", "iter"):
                        yield from _children(item, part, None, getattr(item, part))
                    for if_index, condition in enumerate(item.ifs):
                        yield from _children(item, "ifs", if_index, condition)
                elif isinstance(item, ast.keyword):
                    yield from _children(item, "value", None, item.value)
        elif isinstance(value, ast.expr):
            yield from _children(node, child_name, None, value)


def _constant_mutations(value: object) -> list[tuple[object, str]]:
    if isinstance(value, bool):
        return [(not value, repr(not value))]
    if isinstance(value, int):
        return [(value + 1, repr(value + 1)), (value - 1, repr(value - 1))]
    if isinstance(value, float):
        return [(value + 1.0, repr(value + 1.0)), (value / 2, repr(value / 2))]
    if isinstance(value, (str, bytes)):
        if not value:
            filler = "XX" if isinstance(value, str) else b"XX"
            return [(filler, repr(filler))]
        out = [(value[:0], repr(value[:0]))]
        if len(value) >= 2:
            out += [(value[1:], f"drop first {value[:1]!r}"), (value[:-1], f"drop last {value[-1:]!r}")]
        return out
    return []


def _is_docstring(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def _is_type_alias(statement: ast.AnnAssign) -> bool:
    return isinstance(statement.annotation, ast.Name) and statement.annotation.id == "TypeAlias"


def _short(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split("\n")[0].split())
    return text if len(text) <= 60 else text[:57] + "..."


def find_mutants(path: str, tree: ast.Module) -> list[Mutant]:
    finder = _Finder(Path(path).relative_to("agi_bitrix").as_posix())
    finder.walk(tree)
    return finder.mutants


# -- running one mutant -------------------------------------------------------------------------


class _MutatedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `name` from a mutated tree instead of its file."""

    def __init__(self, name: str, path: Path, tree: ast.Module) -> None:
        self.name, self.path, self.code = name, path, compile(tree, str(path), "exec")

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(self.code, module.__dict__)


def _child(path: str, index: int | None, tests: Sequence[str], quiet: bool) -> int:
    """In a forked child: install mutant `index` of `path` (None: none) and run its tests."""
    import pytest

    os.setpgid(0, 0)
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if index is not None:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        find_mutants(path, tree)[index].apply()
        ast.fix_missing_locations(tree)
        name = path.removesuffix(".py").replace("/", ".")
        _forget_importers_of(name)
        sys.meta_path.insert(0, _MutatedModule(name, ROOT / path, tree))
    args = [*tests, "-x", "-q", "-m", "not asterisk", "-p", "no:cacheprovider", "-p", "no:randomly"]
    return int(pytest.main(args))


@dataclass
class _Job:
    module: str
    index: int | None
    pid: int
    started: float


@dataclass
class Result:
    module: str
    mutant: Mutant
    outcome: str  # killed | survived | timeout


def _preload() -> None:
    """Import, once in the parent, everything the tests import (each child forgets what it mutates)."""
    import pytest  # noqa: F401

    sys.path.insert(0, str(ROOT))
    for test in ["tests/conftest.py", *(test for tests in MODULES.values() for test in tests)]:
        __import__(test.removesuffix(".py").replace("/", "."))
    import phonenumbers

    phonenumbers.parse("+79161234567")  # loads the metadata the tests read most
    # The tests are imported again by pytest in each child (with its assertion rewriting).
    for name in [name for name in sys.modules if name.split(".")[0] == "tests"]:
        del sys.modules[name]


def _forget_importers_of(target: str) -> None:
    """Drop `target` and every project module that imports it, directly or not, from sys.modules,
    so that the child imports them again, now from the mutated module; the rest stays loaded."""
    imports: dict[str, set[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] != "agi_bitrix" or not path:
            continue
        found = imports[name] = set()
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    forget = {target}
    while True:
        more = {name for name, uses in imports.items() if name not in forget and uses & forget}
        if not more:
            break
        forget |= more
    for name in forget:
        sys.modules.pop(name, None)


def run(modules: Sequence[str], jobs: int, timeout: float | None, verbose: bool,
        equivalents: dict[str, str]) -> list[Result]:
    queue: list[tuple[str, int | None]] = []
    mutants: dict[str, list[Mutant]] = {}
    for module in modules:
        mutants[module] = find_mutants(module, ast.parse((ROOT / module).read_text(encoding="utf-8")))
        queue.append((module, None))
        queue += [(module, i) for i in range(len(mutants[module]))]
    _preload()
    os.chdir(ROOT)
    limits: dict[str, float] = {}
    running: dict[int, _Job] = {}
    results: list[Result] = []
    pending = list(queue)

    def start(module: str, index: int | None) -> None:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(module, index, MODULES[module], quiet=index is not None or not verbose)
            finally:
                os._exit(code)
        running[pid] = _Job(module, index, pid, time.monotonic())

    while pending or running:
        while pending and len(running) < jobs:
            module, index = pending[0]
            if index is not None and module not in limits:
                break  # the unmutated run of this module sets its time limit; wait for it
            pending.pop(0)
            start(module, index)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for job in list(running.values()):
                limit = limits.get(job.module, timeout or 600.0)
                if now - job.started > limit:
                    os.killpg(job.pid, signal.SIGKILL)
                    os.waitpid(job.pid, 0)
                    del running[job.pid]
                    if job.index is None:
                        sys.exit(f"{job.module}: its unmutated tests took over {limit:g} s")
                    results.append(Result(job.module, mutants[job.module][job.index], "timeout"))
                    if verbose:
                        print(f"  timeout  {job.module}  {mutants[job.module][job.index].id}", flush=True)
            time.sleep(0.02)
            continue
        job = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if job.index is None:
            if code != 0:
                sys.exit(f"{job.module}: its tests fail without any mutation (exit {code}); fix that first")
            took = time.monotonic() - job.started
            limits[job.module] = timeout or max(10.0, 5 * took)
            print(f"{job.module}: {len(mutants[job.module])} mutants; unmutated tests take {took:.1f} s",
                  flush=True)
            continue
        outcome = "survived" if code == 0 else "killed"
        mutant = mutants[job.module][job.index]
        results.append(Result(job.module, mutant, outcome))
        if verbose or (outcome == "survived" and mutant.id not in equivalents):
            print(f"  {outcome:8} {job.module}:{mutant.line}  {mutant.id}", flush=True)
    return results


def show(modules: Sequence[str], text: str) -> int:
    """Print the change each matching mutant makes and run its tests in the foreground."""
    import difflib

    for module in modules:
        source = (ROOT / module).read_text(encoding="utf-8")
        original = ast.unparse(ast.parse(source)).splitlines()
        for index, mutant in enumerate(find_mutants(module, ast.parse(source))):
            if text not in mutant.id:
                continue
            tree = ast.parse(source)
            find_mutants(module, tree)[index].apply()
            print(f"== {mutant.id}")
            sys.stdout.writelines(line + "\n" for line in difflib.unified_diff(
                original, ast.unparse(ast.fix_missing_locations(tree)).splitlines(), module, "mutant", n=1,
                lineterm=""))
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(_child(module, index, MODULES[module], quiet=False))
            _, status = os.waitpid(pid, 0)
            print(f"== {'survived' if os.waitstatus_to_exitcode(status) == 0 else 'killed'}: {mutant.id}\n")
    return 0


def load_equivalents(path: Path = EQUIVALENTS) -> dict[str, str]:
    equivalents = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        mutant_id, separator, reason = line.partition(" -- ")
        if not separator or not reason.strip():
            sys.exit(f"{path}:{number}: expected `<mutant id> -- <reason>`")
        equivalents[mutant_id.strip()] = reason.strip()
    return equivalents


def report(modules: Sequence[str], results: list[Result], equivalents: dict[str, str]) -> bool:
    """Print the table; True when every module reaches REQUIRED_SCORE."""
    passed = True
    print(f"\n{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'equivalent':>10} {'score':>7}")
    for module in modules:
        mine = [r for r in results if r.module == module]
        killed = sum(r.outcome != "survived" for r in mine)
        equivalent = sum(r.outcome == "survived" and r.mutant.id in equivalents for r in mine)
        survived = len(mine) - killed - equivalent
        counted = len(mine) - equivalent
        score = 100.0 * killed / counted if counted else 100.0
        passed &= score >= REQUIRED_SCORE
        name = Path(module).relative_to("agi_bitrix").as_posix()
        print(f"{name:32} {len(mine):7} {killed:6} {survived:8} {equivalent:10} {score:6.1f}%")
    ids = {r.mutant.id: r for r in results}
    prefixes = tuple(Path(m).relative_to("agi_bitrix").as_posix() + "::" for m in modules)
    stale = [i for i in equivalents if i.startswith(prefixes) and i not in ids]
    killed_equivalents = [i for i in equivalents if i in ids and ids[i].outcome != "survived"]
    for mutant_id in stale:
        print(f"stale: {mutant_id} is listed as equivalent but no longer exists")
    for mutant_id in killed_equivalents:
        print(f"stale: {mutant_id} is listed as equivalent but a test kills it")
    survivors = [r for r in results if r.outcome == "survived" and r.mutant.id not in equivalents]
    if survivors:
        print("\nsurvivors (kill them with a test, or list them with a reason in "
              f"{EQUIVALENTS.relative_to(ROOT)}):")
        for r in survivors:
            print(f"  {r.module}:{r.mutant.line}  {r.mutant.id}")
    print(f"\nrequired: {REQUIRED_SCORE:g}% of the non-equivalent mutants killed in each module: "
          + ("met" if passed else "NOT met"))
    return passed and not stale and not killed_equivalents


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate, e.g. agi_bitrix/phones.py (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="mutants tested at once (default: 2)")
    parser.add_argument("--timeout", type=float, help="seconds before a mutant counts as killed by a hang "
                        "(default: 5 times the unmutated run, at least 10)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--show", metavar="TEXT", help="for each mutant whose id contains TEXT: the change, "
                        "then its tests' output")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every mutant's outcome")
    options = parser.parse_args(argv)
    modules = options.modules or list(MODULES)
    for module in modules:
        if module not in MODULES:
            parser.error(f"{module}: not one of {', '.join(MODULES)}")
    if options.list:
        for module in modules:
            for mutant in find_mutants(module, ast.parse((ROOT / module).read_text(encoding="utf-8"))):
                print(f"{module}:{mutant.line}  {mutant.id}")
        return 0
    if options.show:
        return show(modules, options.show)
    equivalents = load_equivalents()
    started = time.monotonic()
    results = run(modules, options.jobs, options.timeout, options.verbose, equivalents)
    ok = report(modules, results, equivalents)
    print(f"({len(results)} mutants in {time.monotonic() - started:.0f} s with {options.jobs} workers)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
