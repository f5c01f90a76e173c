"""The layering written in README.md ("Architecture"), checked on the source: imports go down only, no cycles."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> its layer; a module may import its own folder or a lower layer, never a higher one.
LAYERS = {"util": 0, "models": 1, "generation": 2, "pretrain": 2, "demo": 3, "scripts": 3}


def project_modules() -> dict:
    modules = {}
    for folder in LAYERS:
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_names(path: Path) -> set:
    """Every absolute module name `path` imports, anywhere in the file (function bodies included)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return targets


def import_graph() -> dict:
    """module -> set of project modules it imports (anywhere in the file, function bodies included)."""
    modules = project_modules()
    return {name: {target for target in imported_names(path) if target in modules and target != name}
            for name, path in modules.items()}


def foreign_imports(folder: Path) -> list:
    """(file, module) for each import in `folder` of another project package (LAYERS) than util."""
    others = set(LAYERS) - {"util"}
    return sorted((path.name, target) for path in folder.rglob("*.py")
                  for target in imported_names(path) if target.split(".")[0] in others)


def test_util_is_a_leaf():
    """util/ imports no other package of the project, not even lazily inside a function."""
    violations = foreign_imports(ROOT / "util")
    assert not violations, violations


def test_the_leaf_check_sees_an_import_inside_a_function(tmp_path):
    (tmp_path / "cache.py").write_text("import torch\n\ndef main():\n    from models.vae import LatentCodec\n")
    assert foreign_imports(tmp_path) == [("cache.py", "models.vae"), ("cache.py", "models.vae.LatentCodec")]


def test_no_folder_imports_a_higher_layer():
    violations = sorted((source, target) for source, targets in import_graph().items() for target in targets
                        if LAYERS[target.split(".")[0]] > LAYERS[source.split(".")[0]])
    assert not violations, violations


def test_generation_and_pretrain_are_siblings():
    crossing = sorted((source, target) for source, targets in import_graph().items() for target in targets
                      if {source.split(".")[0], target.split(".")[0]} == {"generation", "pretrain"})
    assert not crossing, crossing


def test_no_import_cycles():
    graph = import_graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _reports(check, fragment: str) -> bool:
    try:
        check()
    except AssertionError as error:
        return fragment in str(error)
    return False


def test_the_checker_sees_a_cycle_and_an_upward_import(monkeypatch):
    """The checks above would fail on the layout this project had (train <-> sample_ddp, util -> models)."""
    graph = {"generation.train": {"generation.sample_ddp"}, "generation.sample_ddp": {"generation.train"},
             "util.x": {"models.vae"}, "models.vae": set()}
    monkeypatch.setitem(globals(), "import_graph", lambda: graph)
    assert _reports(test_no_import_cycles, "generation.train")
    assert _reports(test_no_folder_imports_a_higher_layer, "util.x")
