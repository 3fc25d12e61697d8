"""The shape of kernels/ itself: one dispatch, one launch helper, no import cycle, one order per op file.

These read the source (ast), so they fail the moment a second copy of the plumbing or a cycle comes back.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
SHARED = {"_dispatch", "_launch", "__init__"}  # the two helper modules and the package
OP_FILES = sorted(p for p in KERNELS.glob("*.py") if p.stem not in SHARED)
SOURCES = sorted([*KERNELS.glob("*.py"), *(ROOT / "engine").glob("*.py"), *(ROOT / "train").glob("*.py"),
                  *(ROOT / "bench").glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _kernel_imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(kernels module, imported names) for every import of a kernels module in `path`, at any depth."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kernels"):
            if node.module == "kernels":  # `from kernels import _launch` names a module
                for a in node.names:
                    found.append((f"kernels.{a.name}" if (KERNELS / f"{a.name}.py").exists() else "kernels", [a.name]))
            else:
                found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("kernels."))
    return found


def test_no_import_cycle_in_kernels():
    graph = {p.stem: set() for p in KERNELS.glob("*.py")}
    for p in KERNELS.glob("*.py"):
        for module, _ in _kernel_imports(p):
            target = module.split(".")[1] if "." in module else "__init__"
            if target != p.stem:
                graph[p.stem].add(target)
    # every module but the package itself must be importable before kernels/__init__ finishes
    assert all("__init__" not in deps for name, deps in graph.items() if name != "__init__"), graph
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail(f"import cycle in kernels/: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_kernel_modules(path):
    """Op files (and everything above kernels/) use each other's public names only; the helper modules
    kernels._dispatch and kernels._launch are private to the package and public within it."""
    for module, names in _kernel_imports(path):
        if path.parent == KERNELS and module.split(".")[-1] == path.stem:
            continue
        private = [n for n in names if n.startswith("_") and n not in SHARED]
        assert not private, f"{path.name} imports private {private} from {module}"
        # bench/compile_report.py mirrors the launchers' choices to compile them: it reads their internals by design
        if path.parent != KERNELS and path.name != "compile_report.py":
            assert module.split(".")[-1] not in {"_dispatch", "_launch"} or path.parent.name == "tests", (
                f"{path.name} reaches into {module}: use the public functions of kernels")


def _defs(path):
    return [n for n in _tree(path).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_one_copy_of_the_plumbing():
    """What every launcher needs lives in kernels/_dispatch.py and kernels/_launch.py, once."""
    banned_names = {"_use_kernel", "_use_triton", "_TRITON_AVAILABLE", "_sm_count", "_cuda_props", "_unit_last",
                    "_unit_last_stride", "_rows", "_autotuned", "_tune", "_op_impl"}
    for path in OP_FILES:
        tree = _tree(path)
        names = {n.name for n in _defs(path)} | {t.id for n in tree.body if isinstance(n, ast.Assign)
                                                for t in n.targets if isinstance(t, ast.Name)}
        assert not names & banned_names, f"{path.name} defines {sorted(names & banned_names)}"
        text = path.read_text()
        for needle in ("multi_processor_count", "triton.autotune", "do_bench", "os.environ", "resolve_impl("):
            assert needle not in text, f"{path.name} mentions {needle}: kernels/_launch.py and _dispatch.py own it"


def test_one_implementation_vocabulary():
    """Callers pass impl through as "auto" | "torch" | "triton"; nobody translates between vocabularies."""
    for path in SOURCES:
        text = path.read_text()
        assert '"auto" if' not in text and "'auto' if" not in text, f"{path} translates impl names"
        assert "def resolve_impl" not in text or path == KERNELS / "_dispatch.py", f"{path} defines resolve_impl"


def _rank(node: ast.AST, public: set[str]) -> int:
    if isinstance(node, ast.ClassDef):
        return 2 if any("Function" in ast.unparse(b) for b in node.bases) else -1
    if any(ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
        return 0
    if node.name.endswith("_ref"):
        return 4
    return 3 if node.name in public else 1


@pytest.mark.parametrize("path", OP_FILES, ids=lambda p: p.name)
def test_op_file_order(path):
    """KERNELS.md's anatomy: @triton.jit kernels, launchers and helpers, autograd.Function, the public function
    (named in the module's __all__), the *_ref reference."""
    tree = _tree(path)
    alls = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                                        for t in n.targets)]
    public = set(ast.literal_eval(alls[0].value)) if alls else set()
    if path.stem != "flash_attention_kernels":
        assert public, f"{path.name} has no __all__ naming its public functions"
    kinds = ["jit kernel", "launcher", "autograd.Function", "public function", "reference"]
    seen = -1
    for node in _defs(path):
        r = _rank(node, public)
        if r < 0:
            continue
        assert r >= seen, f"{path.name}: {kinds[r]} {node.name} comes after a {kinds[seen]}"
        seen = r
    for name in public:
        assert hasattr(__import__(f"kernels.{path.stem}", fromlist=[name]), name), f"{path.name}.__all__: {name}"
