"""The Lib's import graph: one way down, no circles (imports inside functions count too)."""
import ast

from conftest import ROOT

LIB = ROOT / "MedSapiensLandmarks" / "MedSapiensLandmarksLib"


def imports_of(path):
    """Lib modules that ``path`` imports anywhere (``from .x import y``, ``from . import x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:  # a module, or a name of the package's __init__ (__version__), which imports nothing
                out.update(a.name for a in node.names if (path.parent / f"{a.name}.py").exists())
    return out


def find_circle(graph):
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            return path[path.index(node):] + [node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for dep in sorted(graph[node]):
            circle = visit(dep, path + [node])
            if circle:
                return circle
        state[node] = "done"
        return None

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_the_lib_has_no_import_circles():
    graph = {p.stem: imports_of(p) for p in LIB.glob("*.py") if p.stem != "__init__"}
    assert all(dep in graph for deps in graph.values() for dep in deps)
    assert find_circle(graph) is None
    # loading is one way: the model-file rooms never reach up to the detector or the front ends
    below = {"errors", "weights", "cards", "checkpoints", "official", "onnx_io", "model", "backends", "loading"}
    for module in below:
        assert not graph[module] & {"detector", "cli", "web", "bench", "logic"}, module
    assert "cli" not in set().union(*graph.values())  # front ends share inputs.py, not the CLI


def test_the_checker_sees_a_circle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("from . import c\n")
    (tmp_path / "c.py").write_text("def f():\n    from .a import y\n")
    graph = {p.stem: imports_of(p) for p in tmp_path.glob("*.py")}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_circle(graph) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
