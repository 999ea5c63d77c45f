"""The layout rules: data flows one way through the stage modules, helpers never import a stage,
there are no import cycles, and the README's module map names every module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gemma_mlx"
README = PACKAGE.parent / "README.md"

# The stages in the order data flows; each module belongs to one stage, or to none (a shared helper).
STAGES = ["init", "convert", "data", "train", "fuse", "compare", "prefs", "chat", "arena", "web", "export", "run", "cli"]
OWNER = {"formats.gguf": "convert", "formats.hf_export": "fuse", "formats.gguf_write": "export", "training": "train",
         "scoring": "compare", "serving": "arena"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name.removesuffix(".__init__") if name.endswith("__init__") else name] = path
    found.pop("__init__", None)
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Package modules that `name` imports (at any depth in the file, lazy imports included)."""
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, node.module] if node.module else base)
            names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
            found.update(n for n in names if n)
    known = set(modules())
    return {n if n in known else n.rsplit(".", 1)[0] for n in found} & known


def stage_of(name: str) -> str | None:
    if name in STAGES:
        return name
    for prefix, stage in OWNER.items():
        if name == prefix or name.startswith(prefix + "."):
            return stage
    return None


def test_data_flows_one_way_and_helpers_import_no_stage():
    problems = []
    for name, path in modules().items():
        mine = stage_of(name)
        for target in imports_of(name, path):
            theirs = stage_of(target)
            if theirs is None or theirs == mine or name == "cli":
                continue
            if mine is None:
                problems.append(f"helper {name} imports {target} (stage {theirs})")
            elif STAGES.index(theirs) > STAGES.index(mine):
                problems.append(f"{name} (stage {mine}) imports {target}, a later stage ({theirs})")
    assert problems == []


def test_no_import_cycles():
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_training_loop_does_not_import_train():
    assert "train" not in imports_of("training.loop", modules()["training.loop"])


def test_readme_module_map_names_every_module():
    text = README.read_text()
    section = text[text.index("### Module map"):]
    missing = [name for name in modules() if "`" + name.replace(".", "/") not in section]
    assert missing == []
