"""Fine-tuning methods and their registry.

A method is one :class:`~train.core.methods.base.Method` subclass registered under its
``--finetuning_type`` name; adding one is a file and a :func:`register` call. The fit loop and
the checkpointer use only the :class:`Method` interface, never method names.
"""

from __future__ import annotations

from train.core.methods.base import Method, TrainState, check_patterns

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: registers a :class:`Method` subclass under ``cls.name``.

    Example:
        >>> sorted(n for n in names() if n in ("full", "lora", "sift"))
        ['full', 'lora', 'sift']
    """
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a `name` to be registered.")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered method names."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown --finetuning_type {name!r}: registered are {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def build(params, cfg, schedule, rng) -> Method:
    """Builds the method named by ``cfg.finetuning_type`` for ``params``; its optimizer skips
    non-finite steps (:func:`train.core.optim.skip_nonfinite`)."""
    from train.core.optim import skip_nonfinite

    method = get(cfg.finetuning_type)(params, cfg, schedule, rng)
    method.optimizer = skip_nonfinite(method.optimizer)
    return method


def _load_builtins() -> None:
    from train.core.methods import full, lora, sift  # noqa: F401  (register themselves)


__all__ = ["Method", "TrainState", "build", "check_patterns", "get", "names", "register"]
