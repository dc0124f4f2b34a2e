"""The shape of the package, checked from its source: layers, no cycles, stages that only declare.

Every import counts, including imports inside functions (they hide real dependencies). The
layers, from the bottom: shared files/config/report primitives; models and data; the training
loop; evaluations and the planner; stages; the registry, benchmarks and the failures table;
the pipeline; the CLI. A module may import its own layer or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prepretrain"

LAYERS = [
    ("prepretrain.files", 0), ("prepretrain.config", 0), ("prepretrain.report", 0),
    ("prepretrain.data", 1), ("prepretrain.models", 1),
    ("prepretrain.train", 2),
    ("prepretrain.evaluate", 3), ("prepretrain.plan", 3),
    ("prepretrain.stages", 4),
    ("prepretrain.registry", 5), ("prepretrain.bench", 5), ("prepretrain.failures", 5),
    ("prepretrain.pipeline", 6),
    ("prepretrain.cli", 7),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, TYPE_CHECKING included)."""
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def test_every_module_has_a_layer():
    assert [m for m in package_imports() if m != "prepretrain" and layer_of(m) is None] == []


def test_no_import_goes_to_a_higher_layer():
    upward = [f"{source} -> {target}" for source, targets in package_imports().items() for target in targets
              if (layer_of(source) or 0) < (layer_of(target) or 0)]
    assert upward == []


def test_no_import_cycles():
    graph = package_imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_stages_only_declare():
    """No stage imports another stage or works out its run directory, resume state or rank:
    the engine's Run tells them."""
    graph = package_imports()
    for path in (SRC / "stages").glob("*.py"):
        name = module_name(path)
        assert not [t for t in graph[name] if t.startswith("prepretrain.stages.")], name
        text = path.read_text()
        for forbidden in ("out_dir or", "Checkpointer", "RANK", "get_rank", "is_initialized", "default_out_dir",
                          ".latest()", "is_sharded", "save_file("):
            assert forbidden not in text, f"{name} uses {forbidden}"


def test_argument_parsing_lives_in_the_cli():
    users = [module_name(p) for p in SRC.rglob("*.py") if "argparse" in p.read_text()]
    assert users == ["prepretrain.cli"]


def test_public_face():
    from prepretrain.evaluate import ZeroShotScorer, evaluate_encoder, run_evaluation
    from prepretrain.models import create_mae, create_vit, load_encoder

    encoder = load_encoder("", model="vit_micro4", seed=3)
    assert type(encoder) is type(create_vit("vit_micro4"))
    assert create_mae("vit_micro4").patch_size == 4
    assert callable(run_evaluation) and callable(evaluate_encoder) and callable(ZeroShotScorer)
