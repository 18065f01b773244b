"""The layers stay layered: engines (adapters/, lab_engines/) never reach up into the HTTP layer."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import adapters
import lab_engines

REPO = Path(__file__).resolve().parents[2]


def _modules(package) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def test_importing_every_adapter_leaves_litestar_and_the_server_out():
    names = ["adapters", *_modules(adapters)]
    code = (f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litestar', 'server')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert len(names) >= 15  # every backend module was imported, not just the package


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_engine_module_imports_the_server_even_lazily():
    for package in ("adapters", "lab_engines"):
        for path in sorted((REPO / package).rglob("*.py")):
            bad = sorted(m for m in _imports(path) if m == "server" or m.startswith("server."))
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_module_is_far_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in REPO.glob("[!.]*/**/*.py")
            if "tests" not in p.parts and (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_lab_engines_import_without_the_server():
    code = ("import importlib, sys\n"
            f"for name in {_modules(lab_engines)!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litestar', 'server')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_graph() -> dict[str, set[str]]:
    """Module-level imports between the project's own modules (TYPE_CHECKING blocks left out)."""
    paths = {}
    for package in ("server", "adapters", "lab_engines", "victor"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            paths[name] = path
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            for sub in ast.walk(node) if isinstance(node, ast.Import | ast.ImportFrom | ast.If | ast.Try) else ():
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                    deps |= {f"{sub.module}.{a.name}" if f"{sub.module}.{a.name}" in paths else sub.module
                             for a in sub.names}
                elif isinstance(sub, ast.Import):
                    deps |= {a.name for a in sub.names}
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def test_there_are_no_import_cycles():
    graph, cycles = _module_graph(), []

    def visit(node, trail):
        for dep in graph[node]:
            if dep in trail:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, trail + [dep])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, cycles[:3]
