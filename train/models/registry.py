"""The model families: which config class, model classes, weight table and HF architecture
names belong to each HF ``model_type``.

A family is declared once, next to its model classes (:mod:`train.models.encoder` registers
``bert``, ``roberta``, ``xlm-roberta``, ``camembert``; :mod:`train.models.decoder` registers
``llama``, ``qwen2``, ``mistral``), with :func:`register_family`. The loader
(:mod:`train.models.pretrained`) looks families up by ``model_type`` (:func:`family_for`) and
uses the declaration to build, load, and export. This module imports no model class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def _no_prefix(head: str, name: str) -> str:
    return ""


@dataclass(frozen=True)
class Family:
    """One registered model family.

    Attributes:
        name: the HF ``model_type`` (``"llama"``, ``"bert"``, ...).
        kind: ``"encoder"`` or ``"decoder"``.
        config_cls: its config dataclass (``from_hf(dict, **overrides)``, ``to_hf(arch)``).
        models: head name (``"base"``, ``"classifier"``, ``"causal_lm"``) -> model class.
        apply_fns: head name -> ``graphdef -> apply function`` (what the jobs call).
        architectures: head name -> HF architecture written on export
            (``"Qwen2ForCausalLM"``).
        table: the HF <-> NNX rows (:mod:`train.models.weights.mapping`).
        layers_path: the path of the layer stack (``"model/layers"``), for scanned layers.
        default_head: the head when none is asked for.
        normalize: checkpoint-name normalisation before matching.
        export_prefix: ``(head, hf_name) -> prefix`` on export (``"bert."`` under a head).
        optional: nnx path prefixes that may be freshly initialised or dropped (heads).
        drop: checkpoint-name prefixes dropped on purpose (pretraining heads).
        tied: ``{tensor: tensor_it_repeats}`` dropped when ``config.tie_word_embeddings``.
        gguf_architectures: GGUF ``general.architecture`` values read as this family.
    """

    name: str
    kind: str
    config_cls: type
    models: Mapping[str, type]
    apply_fns: Mapping[str, Callable[[Any], Callable]]
    architectures: Mapping[str, str]
    table: tuple[tuple[str, str, str | None], ...]
    layers_path: str
    default_head: str
    normalize: Callable[[Mapping[str, Any]], dict[str, Any]] = dict
    export_prefix: Callable[[str, str], str] = _no_prefix
    optional: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    tied: Mapping[str, str] = field(default_factory=dict)
    gguf_architectures: tuple[str, ...] = ()

    def head_of(self, model: Any) -> str:
        """The head name of a model instance (or class) of this family.

        Example:
            >>> from train.models.decoder import LlamaForCausalLM  # registers the decoders
            >>> family_for("llama").head_of(LlamaForCausalLM)
            'causal_lm'
        """
        cls = model if isinstance(model, type) else type(model)
        for head, c in self.models.items():
            if c is cls:
                return head
        raise ValueError(f"{cls.__name__} is not a model class of the {self.name!r} family.")

    def check_head(self, head: str | None) -> str:
        """``head`` (or the default) after checking the family has it."""
        head = head or self.default_head
        if head not in self.models:
            raise ValueError(
                f"The {self.name!r} family has no {head!r} head; it has {sorted(self.models)}."
            )
        return head


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    *,
    kind: str,
    config_cls: type,
    models: Mapping[str, type],
    apply_fns: Mapping[str, Callable[[Any], Callable]],
    architectures: Mapping[str, str],
    table: Iterable[tuple[str, str, str | None]],
    layers_path: str,
    default_head: str,
    **options: Any,
) -> Family:
    """Declares a family (see :class:`Family` for the fields); re-registering a name replaces
    it.

    Example:
        >>> import train.models.decoder  # registers llama, qwen2 and mistral
        >>> f = family_for("qwen2")
        >>> f.architectures["causal_lm"], f.config_cls.__name__
        ('Qwen2ForCausalLM', 'Qwen2Config')
    """
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', not {kind!r}.")
    if (
        default_head not in models
        or set(models) != set(architectures)
        or set(models) != set(apply_fns)
    ):
        raise ValueError(f"Family {name!r}: models, apply_fns and architectures need one head set.")
    fam = Family(
        name=name,
        kind=kind,
        config_cls=config_cls,
        models=dict(models),
        apply_fns=dict(apply_fns),
        architectures=dict(architectures),
        table=tuple(table),
        layers_path=layers_path,
        default_head=default_head,
        **options,
    )
    _FAMILIES[name] = fam
    return fam


def families() -> list[str]:
    """The registered family names (= HF ``model_type`` values).

    Example:
        >>> import train.models.pretrained  # registers every family
        >>> families()
        ['bert', 'camembert', 'llama', 'mistral', 'qwen2', 'roberta', 'xlm-roberta']
    """
    return sorted(_FAMILIES)


def family_for(model_type: str | None) -> Family:
    """The family of an HF ``model_type``.

    Raises:
        ValueError: an unregistered ``model_type`` (the message lists the registered ones).

    Example:
        >>> import train.models.pretrained  # registers every family
        >>> family_for("gpt_neox")
        Traceback (most recent call last):
        ...
        ValueError: Unknown architecture model_type='gpt_neox'; supported: ['bert', ...].
    """
    if model_type not in _FAMILIES:
        raise ValueError(
            f"Unknown architecture model_type={model_type!r}; supported: {families()}."
        )
    return _FAMILIES[model_type]


def family_for_gguf(architecture: str | None) -> Family:
    """The family that reads GGUF files of ``general.architecture`` ``architecture``.

    Example:
        >>> import train.models.decoder
        >>> family_for_gguf("llama").name
        'llama'
    """
    for fam in _FAMILIES.values():
        if architecture in fam.gguf_architectures:
            return fam
    known = sorted(a for f in _FAMILIES.values() for a in f.gguf_architectures)
    raise ValueError(f"Unsupported GGUF architecture {architecture!r}; supported: {known}.")
