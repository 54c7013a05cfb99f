"""Imports run one way: every regap module imports on its own, and no two modules import each
other (directly or around a loop), counting the imports inside functions too.

A cycle that works only because one of its imports sits inside a function breaks as soon as
someone moves that import to the top of its file; these tests catch it before that happens."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Import edges allowed to close a cycle, each with its reason.
ALLOWED_BACK_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def regap_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SRC / "regap").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_imports(name: str, path: Path, modules: set[str]) -> dict[str, bool]:
    """The regap modules `name` imports -> whether one of those imports is at module level.
    Imports inside functions count; those under `if TYPE_CHECKING:` do not (they never run).
    `from package import name` is an edge to the submodule when `name` is one."""
    found: dict[str, bool] = {}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def add(target: str, top: bool) -> None:
        if target in modules and target != name:
            found[target] = found.get(target, False) or top

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit_node(other, top)
                continue
            visit_node(child, top)

    def visit_node(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, top)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, top)
        else:
            inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(node, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def import_graph() -> dict[str, dict[str, bool]]:
    modules = regap_modules()
    return {name: module_imports(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a back-edge hidden inside a function still closes a cycle."""
    a = tmp_path / "a.py"
    a.write_text("import regap.b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from regap.a import x\n")
    c = tmp_path / "c.py"
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from regap.a import x\n")
    names = {"regap.a", "regap.b", "regap.c"}
    graph = {name: set(module_imports(name, path, names))
             for name, path in (("regap.a", a), ("regap.b", b), ("regap.c", c))}
    assert module_imports("regap.b", b, names) == {"regap.a": False}
    assert graph["regap.c"] == set()  # TYPE_CHECKING imports never run
    assert cycles(graph) == [["regap.a", "regap.b"]]


def test_no_import_cycle_inside_models():
    graph = import_graph()
    models = {name: {t for t in targets if t.startswith("regap.models")}
              for name, targets in graph.items() if name.startswith("regap.models")}
    assert cycles(models) == []


def test_no_import_cycle_in_regap():
    graph = import_graph()
    for (source, target) in ALLOWED_BACK_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: drop it from ALLOWED_BACK_EDGES"
        assert graph[source][target] is False, f"{source} imports {target} at module level; keep it in the function"
    pruned = {name: {t for t in targets if (name, t) not in ALLOWED_BACK_EDGES} for name, targets in graph.items()}
    assert cycles(pruned) == []


def test_models_imports_no_higher_layer_at_module_level():
    """`regap.models` is below train, gap, safety, utility and the CLI: importing it must not
    import them, at module level or inside a function."""
    graph = import_graph()
    higher = ("regap.train", "regap.gap", "regap.safety", "regap.utility", "regap.commands", "regap.cli",
              "regap.study", "regap.analysis", "regap.defenses")
    for name, targets in graph.items():
        if name.startswith("regap.models"):
            upward = sorted(t for t, top in targets.items() if t.startswith(higher) and
                            (top or (name, t) not in ALLOWED_BACK_EDGES))
            assert upward == [], f"{name} imports {upward}"


def package_of(module: str) -> str:
    """The top-level part of regap a module belongs to: `regap.safety.runner` -> `safety`,
    `regap.files` -> `files`, `regap` -> `regap`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, dict[str, bool]]) -> dict[str, set[str]]:
    """Module edges lifted to packages (function-level imports count), self-edges dropped."""
    packages: dict[str, set[str]] = {package_of(name): set() for name in graph}
    for name, targets in graph.items():
        for target in targets:
            if package_of(target) != package_of(name):
                packages[package_of(name)].add(package_of(target))
    return packages


def test_package_graph_lifts_module_edges():
    graph = {"regap.a.x": {"regap.b.y": False}, "regap.b.y": {"regap.b.z": True}, "regap.b.z": {},
             "regap.c": {"regap.a.x": True}}
    assert package_graph(graph) == {"a": {"b"}, "b": set(), "c": {"a"}}
    assert cycles(package_graph({**graph, "regap.b.z": {"regap.c": False}})) == [["a", "b", "c"]]


def test_no_import_cycle_between_packages():
    """Packages import one way: gap and defenses below safety and utility, models below them all;
    no two top-level packages of regap import each other, even around a loop or inside a function."""
    assert cycles(package_graph(import_graph())) == []


def test_defenses_import_no_package_that_imports_them():
    """Calibration pairs are passed in (`make_pairs`), so the defenses need neither the request
    sources and conditions (safety) nor the gap."""
    packages = package_graph(import_graph())
    assert not packages["defenses"] & {"safety", "gap", "utility", "study", "commands"}


_CHILD = textwrap.dedent("""
    import importlib, os, sys, traceback
    # Third-party libraries load once here; each regap module is then imported in a forked child
    # that has no regap module loaded, as in a fresh interpreter.
    for heavy in ("torch", "transformers", "numpy", "PIL.Image", "safetensors.torch", "scipy.stats", "pandas"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            pass
    assert not any(m == "regap" or m.startswith("regap.") for m in sys.modules)
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name and not exc.name.startswith("regap"):
                    print(f"SKIP {name}: optional dependency {exc.name} missing", flush=True)
                else:
                    traceback.print_exc()
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(name)
    print("FAILED " + " ".join(failed) if failed else "ALL OK", flush=True)
    sys.exit(1 if failed else 0)
""")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone():
    names = sorted(regap_modules())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _CHILD, *names], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "ALL OK" in result.stdout


def test_no_package_depends_on_a_package_that_depends_on_it_through_models_and_train():
    """A training output folder is a model folder format read by `regap.models`: nothing in
    `regap.models` imports `regap.train`, even inside a function."""
    graph = import_graph()
    upward = sorted((name, target) for name, targets in graph.items() if name.startswith("regap.models")
                    for target in targets if target == "regap.train" or target.startswith("regap.train."))
    assert upward == []


@pytest.mark.parametrize("name, home", [("MoCa", "regap.models.moca"), ("decoder_layers", "regap.models.layers"),
                                        ("load_trained", "regap.models.loading.load")])
def test_names_that_moved_out_of_train_have_one_home_and_warn_at_the_old_one(name, home):
    import importlib

    import regap.train

    assert name not in regap.train.__all__
    with pytest.warns(DeprecationWarning, match=f"regap.train.{name} moved"):
        old = getattr(regap.train, name)
    assert old is getattr(importlib.import_module(home), name)
