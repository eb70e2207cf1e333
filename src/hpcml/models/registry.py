"""Name -> architecture: built-ins, installed plugins, and a user's `module:function` spec.

Three kinds of names build a model, all called as `factory(input_shape=..., num_outputs=..., **kwargs)`:
- a built-in (`mlp`, `cnn1d`, `convnet1d`, `cnn2d`, `mobilenet_v2`, `mobilenet_v3_small`, `resnet18`,
  `resnet34`);
- an installed plugin: an entry point in group `hpcml.models` (`tiny = mypkg.nets:build`), trusted
  like any installed package;
- a spec `module:function` (or `pkg.sub:Class`), the uvicorn / entry-point convention: code outside
  hpcml, imported only with `trust_code=True`, so a model.json can never import code by itself.

Nothing here imports torch or a model's module until a model is built, so config validation can
consult the names cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from typing import Any

from hpcml.errors import UsageError

__all__ = [
    "ENTRY_POINT_GROUP",
    "MODEL_NAMES",
    "ModelBuildError",
    "ModelInfo",
    "build_from_factory",
    "check_output",
    "check_trust",
    "create_model",
    "default_model_for",
    "recipe_for",
    "describe_models",
    "is_spec",
    "list_models",
    "name_problem",
    "plugins",
]

ENTRY_POINT_GROUP = "hpcml.models"

# name -> "module:callable"; imported lazily so the registry is cheap to consult (config validation).
_BUILTINS: dict[str, str] = {
    "mlp": "hpcml.models.mlp:MLP",
    "cnn1d": "hpcml.models.cnn:CNN1d",
    "convnet1d": "hpcml.models.cnn:ConvNet1d",
    "cnn2d": "hpcml.models.cnn:CNN2d",
    "mobilenet_v2": "hpcml.models.mobilenet:MobileNetV2",
    "mobilenet_v3_small": "hpcml.models.mobilenet:MobileNetV3Small",
    "resnet18": "hpcml.models.resnet:resnet18",
    "resnet34": "hpcml.models.resnet:resnet34",
}
MODEL_NAMES = tuple(_BUILTINS)
SPEC_HELP = "module:function (your own nn.Module factory)"


class ModelBuildError(UsageError):
    """The model's own factory raised: on the meta device that means "build it on the CPU instead"."""


def list_models() -> list[str]:
    """Built-in names, then installed plugin names."""
    return [*MODEL_NAMES, *plugins()]


# What `lr: null` and `epochs: null` become for a model (training/run.py resolves them into config.yaml).
# convnet1d, measured on MNIST-1D with AdamW + onecycle, batch 100, 10 seeds (2-core Xeon, 2026-12-03):
# lr 3e-2 over 8 epochs reached 98.5% test accuracy after a median of 1.5 s (6 epochs), final median
# 98.75%; the former lr 1e-2 over 10 epochs needed 2.0 s (8 epochs) for a final median of 98.75%.
DEFAULT_RECIPE: dict[str, float | int] = {"lr": 1e-2, "epochs": 10}
RECIPES: dict[str, dict[str, float | int]] = {"convnet1d": {"lr": 3e-2, "epochs": 8}}


RECIPE_OPTIM = ("adamw", "onecycle")  # what the recipes were measured with


def recipe_for(name: str, *, optimizer: str = "adamw", schedule: str = "onecycle") -> dict[str, float | int]:
    """The default lr and epochs for model `name` (built-in, plugin or module:function). A model's own
    recipe holds for AdamW + onecycle, what it was measured with; other optimizers or schedules get
    the generic one."""
    own = RECIPES.get(name, {}) if (optimizer, schedule) == RECIPE_OPTIM else {}
    return {**DEFAULT_RECIPE, **own}


def default_model_for(kind: str) -> str:
    """The model `--model auto` picks for a dataset kind (sequence, image, tabular)."""
    return {"sequence": "convnet1d", "image": "cnn2d"}.get(kind, "mlp")


@functools.cache
def plugins() -> dict[str, Any]:
    """Installed entry points of group `hpcml.models`, name -> EntryPoint (read once per process;
    nothing is imported). A name that a built-in already has, or a second one, is ignored here and
    shown by `hpcml models` as a clash."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTINS and ep.name not in found:
            found[ep.name] = ep
    return found


def is_spec(name: str) -> bool:
    """`module:function` syntax: dotted identifiers on both sides of one colon."""
    module, sep, attr = name.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    return bool(sep) and all(p.isidentifier() for p in parts)


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a model (without importing anything), or None if it can."""
    if name in _BUILTINS or name in plugins() or is_spec(name):
        return None
    valid = ", ".join([*MODEL_NAMES, *plugins()])
    if ":" in name:
        return f"bad model spec {name!r}: expected module:function, e.g. mynets:build or pkg.sub:Net"
    return f"unknown model {name!r}; valid: {valid}, or {SPEC_HELP}"


def needs_trust(name: str) -> bool:
    """True for a spec: code outside hpcml and outside the installed plugins."""
    return name not in _BUILTINS and name not in plugins() and is_spec(name)


def check_trust(name: str, trust_code: bool, *, what: str = "the model") -> None:
    """Refuse a spec without `trust_code`, naming it, before anything is imported."""
    if needs_trust(name) and not trust_code:
        raise UsageError(
            f"{what} names code outside hpcml ({name}); pass --trust-code / trust_code=True to import it"
        )


def create_model(
    name: str, *, input_shape: tuple[int, ...], num_outputs: int, trust_code: bool = False, **kwargs: Any
):
    """Build a model by built-in name, plugin name or `module:function` spec (the last needs
    `trust_code=True`). `num_outputs=1` means a single regression output.

    Built on the current default device (`with torch.device("meta"):` builds shapes only). A plugin
    or spec model is checked with one forward of a zero batch (2 rows of `input_shape`): it must
    return a (2, num_outputs) tensor. On `meta` a model that cannot run there is not checked.
    """
    problem = name_problem(name)
    if problem:
        raise UsageError(problem)
    check_trust(name, trust_code)
    shape = tuple(input_shape)
    if name in _BUILTINS:
        return _create_builtin(name, shape, num_outputs, kwargs)
    return build_from_factory(
        _load_factory(name), name=name, input_shape=shape, num_outputs=num_outputs, **kwargs
    )


def build_from_factory(
    factory: Any, *, name: str, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any
):
    """Call a user's factory (a plugin, a spec, or a callable given to `hpcml.train(model=)`) the way
    every architecture is called, and check what it returns (a Module of the task's output width)."""
    shape = tuple(input_shape)
    try:
        module = factory(input_shape=shape, num_outputs=num_outputs, **kwargs)
    except Exception as err:  # the user's code: name it and its error, not a traceback into it
        raise ModelBuildError(f"model {name}: building it raised {_one_line(err)}") from None
    check_output(name, module, shape, num_outputs)
    return module


def _create_builtin(name: str, shape: tuple[int, ...], num_outputs: int, kwargs: dict[str, Any]):
    cls = _load_builtin(name)
    _check_kwargs(name, cls, kwargs)
    try:
        return cls(input_shape=shape, num_outputs=num_outputs, **kwargs)
    except TypeError as err:  # unknown or missing keyword argument
        raise UsageError(f"model {name}: {err}") from None
    except ValueError as err:  # e.g. an input shape the architecture cannot take
        raise UsageError(f"model {name}: {err}") from None


def _load_factory(name: str):
    ep = plugins().get(name)
    if ep is not None:
        try:
            factory = ep.load()
        except Exception as err:  # a broken install: name the plugin and its package
            dist = f" from {ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) else ""
            raise UsageError(
                f"model plugin {name!r} ({ep.value}{dist}) is broken: {_one_line(err)}"
            ) from None
        target = ep.value
    else:
        factory, target = _import_spec(name), name
    if not callable(factory):
        raise UsageError(f"model {target}: {type(factory).__name__} object is not callable")
    return factory


def _import_spec(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise UsageError(
                f"model {spec}: module {err.name!r} not found (is it on PYTHONPATH or installed?)"
            ) from None
        raise UsageError(f"model {spec}: importing {module_name} failed: {_one_line(err)}") from None
    except Exception as err:
        raise UsageError(f"model {spec}: importing {module_name} failed: {_one_line(err)}") from None
    path = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"model {spec}: {path} has no attribute {part!r}")
        obj, path = getattr(obj, part), f"{path}.{part}"
    return obj


def check_output(name: str, module: Any, shape: tuple[int, ...], num_outputs: int) -> None:
    """A Module whose forward maps (2, *shape) to (2, num_outputs): the task's output width."""
    import itertools

    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model {name}: returned {type(module).__name__}, not a torch.nn.Module")
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = first.device if first is not None else torch.get_default_device()
    training = module.training
    module.eval()  # no running-stat updates, no dropout: the check must not change the model
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape, device=device))
    except Exception as err:
        if device.type == "meta":
            return  # this model needs real tensors; it is checked when built on the CPU
        raise UsageError(
            f"model {name}: forward of a zero batch of input shape {shape} failed: {_one_line(err)}"
        ) from None
    finally:
        module.train(training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_outputs):
        raise UsageError(
            f"model {name}: output is {got} for 2 rows of input shape {shape}; the task needs "
            f"(2, {num_outputs}): (batch, num_outputs)"
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _check_kwargs(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    """kwargs of the types the architecture declares: a width of 1e9 (a float) or true is an error
    here, not a confusing one inside torch. Unknown names are left to the constructor's TypeError."""
    hints = typing.get_type_hints(cls.__init__ if isinstance(cls, type) else cls)
    for key, value in kwargs.items():
        want = hints.get(key)
        if want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif want is bool:
            ok = isinstance(value, bool)
        elif want == list[int] | None:
            ok = value is None or (
                isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            )
        else:
            continue
        if not ok:
            raise UsageError(f"model {name}: kwargs.{key} must be {_TYPE_WORDS[want]}, got {value!r}")


_TYPE_WORDS = {
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list[int] | None: "a list of whole numbers",
}


# --------------------------------------------------------------------------------------- catalog


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One row of `hpcml models`: where a name points and the keyword arguments it takes."""

    name: str
    kind: str  # "built-in" | "plugin"
    target: str  # module:callable
    source: str  # "hpcml" or the distribution that installs the plugin
    kwargs: dict[str, dict[str, Any]]  # name -> {"default": ..., "type": ...} ("required": no default)
    error: str | None = None  # a broken plugin: why it cannot be used


def describe_models() -> list[ModelInfo]:
    """Every built-in and installed plugin with its kwargs (from `inspect.signature`). Plugins are
    imported (installed code is trusted); a broken one is listed with its error, never raised."""
    from importlib.metadata import entry_points

    rows = [ModelInfo(n, "built-in", t, "hpcml", _signature(_load_builtin(n))) for n, t in _BUILTINS.items()]
    seen = set(_BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) else "?"
        if ep.name in seen:
            clash = f"the name {ep.name!r} is already taken (a built-in or an earlier plugin); ignored"
            rows.append(ModelInfo(ep.name, "plugin", ep.value, dist, {}, clash))
            continue
        seen.add(ep.name)
        try:
            rows.append(ModelInfo(ep.name, "plugin", ep.value, dist, _signature(_load_factory(ep.name))))
        except UsageError as err:
            rows.append(ModelInfo(ep.name, "plugin", ep.value, dist, {}, str(err)))
    return rows


def _load_builtin(name: str):
    module, attr = _BUILTINS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _signature(factory: Any) -> dict[str, dict[str, Any]]:
    """kwargs other than input_shape / num_outputs: default (JSON-able or its repr) and type name."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a readable signature
        return {}
    out: dict[str, dict[str, Any]] = {}
    for p in params:
        if p.name in ("self", "input_shape", "num_outputs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        entry: dict[str, Any] = {}
        if p.default is p.empty:
            entry["required"] = True
        else:
            simple = p.default is None or isinstance(p.default, bool | int | float | str)
            entry["default"] = p.default if simple else repr(p.default)
        if p.annotation is not p.empty:
            ann = p.annotation
            entry["type"] = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        out[p.name] = entry
    return out
