"""The import structure of the two packages, read from the source (ast): no import circle anywhere in the library
(``peft_ctrl``, ``trainer_callbacks``) or the application (``peft_ctrl_app``), lazy imports inside functions
included; the library imports nothing from the application; the bottom layer imports nothing of peft_ctrl; the
methods do not import the distributed launchers; and the command line starts without loading torch or peft."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("peft_ctrl", "trainer_callbacks")
APPLICATION = ("peft_ctrl_app",)
# The bottom layer: shared mechanics every method may use.
BOTTOM = {
    "peft_ctrl._checks",
    "peft_ctrl.sharding",
    "peft_ctrl.capabilities",
    "peft_ctrl.atomic",
    "peft_ctrl.factors",
    "peft_ctrl.dtypes",
}
# The methods and what they are built from.
METHODS = ("peft_ctrl.state_ctrl", "peft_ctrl.seal", "peft_ctrl.sublora", "peft_ctrl.optim", "peft_ctrl.ops")
METHOD_BASES = {"peft_ctrl.linear_adapter", "peft_ctrl.metrics", "peft_ctrl._registry"}


def modules() -> dict[str, Path]:
    found = {}
    for package in LIBRARY + APPLICATION:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """Every module of the two packages that ``name`` imports, at the top or inside a function. ``from package
    import x`` counts as importing ``package.x`` when that is a module, else ``package``."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{prefix}.{a.name}" for a in node.names]
            targets = subs if all(s in MODULES for s in subs) else [prefix, *(s for s in subs if s in MODULES)]
            found |= {t for t in targets if t in MODULES}
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


def within(name: str, packages: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_no_import_circle():
    """Depth-first search for a back edge; reports the circle it finds."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                circle = path[path.index(dep) :] + [dep]
                pytest.fail("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(BOTTOM))
def test_the_bottom_layer_imports_nothing_of_peft_ctrl(name):
    assert GRAPH[name] == set(), GRAPH[name]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, METHODS) or n in METHOD_BASES))
def test_methods_do_not_import_the_launchers(name):
    wrong = {dep for dep in GRAPH[name] if within(dep, {"peft_ctrl.distributed"})}
    assert not wrong, f"{name} imports {sorted(wrong)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if within(n, LIBRARY)))
def test_the_library_imports_nothing_from_the_application(name):
    wrong = {dep for dep in GRAPH[name] if within(dep, APPLICATION)}
    assert not wrong, f"{name} imports {sorted(wrong)}"


def test_the_graph_is_read():
    """The reader finds the imports it must (so the tests above cannot pass on an empty graph)."""
    assert "peft_ctrl.sharding" in GRAPH["peft_ctrl.linear_adapter"]
    assert "peft_ctrl.state_ctrl.placement" in GRAPH["peft_ctrl.state_ctrl.model"]
    assert "peft_ctrl.capabilities" in GRAPH["peft_ctrl.distributed"]
    assert "peft_ctrl.state_ctrl" in GRAPH["peft_ctrl_app.lm_bench"]
    assert "peft_ctrl_app.commonsense" in GRAPH["peft_ctrl_app.tasks"]
    assert "peft_ctrl.distributed" in GRAPH["trainer_callbacks.sublora"]


def test_importing_the_library_loads_no_launcher_and_no_application():
    """``import peft_ctrl`` (what registers the methods) does not load peft_ctrl.distributed, any application
    module, or transformers' TrainingArguments."""
    import subprocess
    import sys

    code = (
        "import sys, peft_ctrl; "
        "print(sorted(m for m in sys.modules if m.startswith(('peft_ctrl.distributed', 'peft_ctrl_app')) "
        "or m == 'transformers.training_args'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("argv", [["seal", "verify", "--help"], ["seal", "keygen", "--help"], ["--help"]])
def test_the_command_line_answers_help_without_loading_torch_or_peft(argv):
    """The CLI imports a command's modules only when that command runs: its parsers are built from the
    application's own light modules, so ``peft-ctrl seal verify --help`` starts in well under 2 s."""
    import subprocess
    import sys
    import time

    code = (
        "import sys; from peft_ctrl_app.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'peft', 'transformers', 'peft_ctrl') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    assert "usage: " in out
    assert out.strip().splitlines()[-1] == "HEAVY []", out
    assert elapsed < 2.0, f"{' '.join(argv)} took {elapsed:.2f} s"


def test_library_files_and_functions_stay_small():
    """Issue 34's bar for the library: no file over 400 lines, no function over 60 (the application's runner and
    tables are not held to it)."""
    too_long = []
    for name, path in MODULES.items():
        if not within(name, LIBRARY):
            continue
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
