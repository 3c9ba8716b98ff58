"""Deprecated: the HF loading / export of this module moved.

Files and names: :mod:`train.models.weights`; loading and export:
:mod:`train.models.pretrained` (``load_pretrained``, ``Pretrained.export``, ``export_model``).
Only ``export_hf`` (for ``train.instruct.export_merged``) and ``write_hf_dir`` are left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flax import nnx

from train.models.pretrained import export_model
from train.models.weights.hf_dir import write_hf_dir

__all__ = ["export_hf", "write_hf_dir"]  # TODO(issue 13): remove this module with its callers


# TODO(issue 13): remove once train.generate/instruct use Pretrained (Pretrained.export).
def export_hf(
    model: nnx.Module, config: Any, tokenizer: Any | None, out_dir: str | os.PathLike
) -> Path:
    """Alias of :func:`train.models.pretrained.export_model` (argument order of old).

    Example:
        >>> import tempfile
        >>> from train.models.decoder import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> d = export_hf(m, m.cfg, None, tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'model.safetensors']
    """
    return export_model(model, out_dir, tokenizer, config)
