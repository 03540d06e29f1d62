"""The shared plumbing: layering without import circles, settings checks, the loop state and
its checkpoint, and the one batch order."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from jointkl import InputError
from jointkl.checkpoint import LoopState, check_checkpointing, latest_checkpoint
from jointkl.minibatch import BatchOrder
from jointkl.settings import (
    Settings,
    nonnegative_int,
    one_of,
    optional,
    or_callable,
    positive_float,
    positive_int,
    setting,
)

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "src" / "jointkl"


def _module_name(path: Path) -> str:
    """The import name of a file under src/jointkl, models/ or inference/."""
    if path.is_relative_to(CORE):
        parts = ("jointkl", *path.relative_to(CORE).with_suffix("").parts)
    else:
        top = path.relative_to(ROOT).parts[0]
        parts = ("jointkl", top, *path.relative_to(ROOT / top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every jointkl module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("jointkl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jointkl"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = [*CORE.rglob("*.py"), *(ROOT / "models").rglob("*.py")]
    files += list((ROOT / "inference").rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_plugin(module: str) -> bool:
    """A module of the engines or the zoo (not the core)."""
    return _in("jointkl.models", module) or _in("jointkl.inference", module)


def _core_modules(graph) -> list[str]:
    return [m for m in graph if not _is_plugin(m) and m not in ("jointkl", "jointkl.cli")]


def test_the_core_has_no_import_circle():
    graph = _graph()
    core = set(_core_modules(graph))
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m] & core):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(core):
        if m not in state:
            visit(m, [m])


def test_the_core_imports_no_engine_or_model_and_models_import_no_engine():
    graph = _graph()
    for m in _core_modules(graph):
        bad = [n for n in graph[m] if _is_plugin(n)]
        assert not bad, f"{m} imports {bad}: only jointkl/__init__ and the cli may"
    for m, deps in graph.items():
        if _in("jointkl.models", m):
            bad = [n for n in deps if _in("jointkl.inference", n)]
            assert not bad, f"{m} imports the engines {bad}"


def test_leaf_modules_import_only_the_errors():
    graph = _graph()
    for leaf in ("jointkl.sites", "jointkl.registry", "jointkl.settings"):
        assert graph[leaf] <= {"jointkl.errors", "jointkl.errors.InputError"}, graph[leaf]


def test_the_converter_names_no_engine():
    text = (CORE / "inferencedata.py").read_text()
    for name in ("svi", "nce", "em", "langevin", "nuts"):
        assert f'"{name}"' not in text and f"'{name}'" not in text


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class _Toy(Settings):
    owner: ClassVar[str] = "Toy"
    steps: int = setting(10, positive_int)
    lr: float = setting(0.1, positive_float)
    kind: str = setting("a", one_of("a", "b"))
    every: int | None = setting(None, optional(positive_int))
    warmup: int = setting(0, nonnegative_int)
    loss: object = setting("a", or_callable(one_of("a", "b")))

    def validate(self) -> None:
        if self.every is not None and self.every > self.steps:
            self.fail(f"every ({self.every}) must be <= steps ({self.steps})")


def test_settings_normalise_values_and_stay_frozen():
    s = _Toy(steps=2.0, lr=1)
    assert s.steps == 2 and isinstance(s.steps, int) and isinstance(s.lr, float)
    with pytest.raises(AttributeError):
        s.steps = 3
    assert _Toy.names() == ["steps", "lr", "kind", "every", "warmup", "loss"]
    assert _Toy.default("lr") == 0.1
    fn = lambda *a: 0  # noqa: E731
    assert _Toy(loss=fn).loss is fn and _Toy(loss=fn).to_json()["loss"] == "callable"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "Toy: steps must be a positive int, got 0"),
        ({"steps": 2.5}, "steps must be a positive int"),
        ({"steps": True}, "steps must be a positive int"),
        ({"lr": float("nan")}, "lr must be a positive float"),
        ({"kind": "c"}, "kind must be one of"),
        ({"every": 0}, "Toy: every must be a positive int or None, got 0"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"loss": 3}, r"loss must be one of \('a', 'b'\) or a callable, got 3"),
        ({"every": 20}, r"Toy: every \(20\) must be <= steps"),
    ],
)
def test_bad_settings_name_the_owner_the_setting_and_the_value(kwargs, message):
    with pytest.raises(InputError, match=message):
        _Toy(**kwargs)


def test_checkpoint_settings_need_a_folder():
    with pytest.raises(InputError, match="X: checkpoint_every needs checkpoint_dir"):
        check_checkpointing("X", 5, None, False)
    with pytest.raises(InputError, match="X: resume=True needs checkpoint_dir"):
        check_checkpointing("X", None, None, True)
    with pytest.raises(InputError, match="positive int"):
        check_checkpointing("X", 0.5, "ck", False)


# ---------------------------------------------------------------------- loop state
def test_loop_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(7)
    state = LoopState(
        step=12,
        params={"w": torch.randn(3, dtype=torch.float64)},
        optim={"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 0.1}]},
        rng={**LoopState.torch_rng(), "chains": gen.get_state()},
        history=[3.0, 2.5, 2.25],
        extra={"eps": torch.tensor(0.01), "stage": 2},
    )
    path = state.save(tmp_path)
    assert path.name == "step-00000012.pt" and latest_checkpoint(tmp_path) == path
    torch.load(path, weights_only=True)  # plain tensors and containers only
    back = LoopState.load(path)
    assert back.step == 12 and back.history == [3.0, 2.5, 2.25]
    assert torch.equal(back.params["w"], state.params["w"])
    assert torch.equal(back.optim["state"][0]["exp_avg"], state.optim["state"][0]["exp_avg"])
    assert back.extra["stage"] == 2
    expected = torch.rand(4)
    back.restore_torch_rng()
    assert torch.equal(torch.rand(4), expected)


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="step-00000001.pt could not be read"):
        LoopState.load(bad)
    torch.save({"step": 1}, tmp_path / "step-00000002.pt")
    with pytest.raises(InputError, match="not a jointkl checkpoint"):
        LoopState.load(tmp_path / "step-00000002.pt")


# ---------------------------------------------------------------------- batch order
@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_order_visits_every_row_once_per_epoch_and_depends_on_seed_and_step_only(drop_last):
    order = BatchOrder(10, 3, seed=5, drop_last=drop_last)
    per_epoch = 3 if drop_last else 4
    assert order.per_epoch == per_epoch
    epoch = torch.cat([order.indices(j) for j in range(per_epoch)])
    assert len(epoch) == (9 if drop_last else 10) and len(set(epoch.tolist())) == len(epoch)
    fresh = BatchOrder(10, 3, seed=5, drop_last=drop_last)
    # Out of order, as a resumed run asks: the same rows for the same step.
    assert torch.equal(fresh.indices(per_epoch + 1), order.indices(per_epoch + 1))
    assert torch.equal(fresh.indices(1), BatchOrder(10, 3, 5, drop_last).indices(1))

    def first_epoch(o: BatchOrder) -> torch.Tensor:
        return torch.cat([o.indices(j) for j in range(o.per_epoch)])

    # Another seed or another stream: another order (10! permutations; a clash is a bug).
    assert not torch.equal(first_epoch(BatchOrder(10, 3, 6, drop_last)), epoch)
    assert not torch.equal(first_epoch(BatchOrder(10, 3, 5, drop_last, stream=7)), epoch)
    assert order.scale(order.indices(0)) == pytest.approx(10 / 3)


def test_batch_order_refuses_a_batch_larger_than_the_data():
    with pytest.raises(InputError, match="batch_size=11 exceeds the data size 10"):
        BatchOrder(10, 11, seed=0)
