"""The compact-gradient SIFT path for any JAX training loop.

:class:`Sift` plans which leaves of a parameter tree train sparsely, densely or not at all,
splits the tree into what trains (``k``-vectors of selected weights + dense leaves), the
donated buffers (merged weights, indices) and the frozen rest, and gives the loss its view of
the parameters (the backward emits ``grad_W[idx]`` only), the in-place write after an update,
selection (inside the backward, from an accumulated score, or per shard / per layer slice),
re-selection, shared budgets (joint top-k or by gradient mass), checkpoint state with global
indices and delta extraction.
:mod:`sift_jax.nnx` wraps it for Flax NNX models.

Scanned models: plan with ``stacked=<the [L, ...] leaves>, layer_views=True``; the plan's
params then hold each stacked sparse leaf as a :class:`LayerView` (the raw stacked weight and
its per-layer values and indices; :class:`LayerProbe` at selection), and the model calls
:func:`apply_layer` on its layer's slice inside the scan body, so the view's gather (and the
selection probe) act per layer. The lower-level pieces (scopes and the custom-VJP functions)
are here too.
"""

from sift_jax._src.compact import (
    BUDGETS,
    SCOPES,
    Leaf,
    Sift,
    SiftState,
    budget_counts,
    joint_topk,
    mass_counts,
    value_and_grad,
)
from sift_jax._src.indexing import (
    PROBE_BASE,
    LayerProbe,
    LayerView,
    PerSlice,
    Scope,
    WholeTensor,
    apply_layer,
    decode_probe,
    encode_probe,
    is_layer_input,
    probe_fn,
    view_fn,
)
from sift_jax._src.schedule import Schedule
from sift_jax._src.shard_local import PerShard

__all__ = [
    "BUDGETS",
    "PROBE_BASE",
    "SCOPES",
    "LayerProbe",
    "LayerView",
    "Leaf",
    "PerShard",
    "PerSlice",
    "Schedule",
    "Scope",
    "Sift",
    "SiftState",
    "WholeTensor",
    "apply_layer",
    "budget_counts",
    "decode_probe",
    "encode_probe",
    "is_layer_input",
    "joint_topk",
    "mass_counts",
    "probe_fn",
    "value_and_grad",
    "view_fn",
]
