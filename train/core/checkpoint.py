"""Orbax checkpoints holding only what is trained, the optimizer state, the step and data position.

Layout: ``<output_dir>/checkpoints/<step>/`` written by an orbax ``CheckpointManager``, which
writes into a temporary directory and renames it when complete, so a crash mid-save leaves no
directory that :func:`latest_step` (and so a resume) would pick up.

For SIFT only the selected values of each sparse tensor are stored (O(k)), next to the
optimizer state that holds their indices; dense-trained tensors are stored whole. Frozen
weights are never stored: a resume rebuilds them from the base model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import sift_jax
from sift_jax._src.paths import path_to_str
from train.methods import flatten_paths, unflatten_paths


def _leaves_dict(tree: Any) -> dict[str, Any]:
    """A tree's leaves keyed by position: orbax-safe whatever the tree's node types."""
    return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _from_leaves_dict(template: Any, leaves: dict[str, Any]) -> Any:
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [leaves[k] for k in sorted(leaves)])


def compact_trained(method, trainable: Any, opt_state: Any) -> dict[str, Any]:
    """What a checkpoint stores of ``trainable``: SIFT sparse tensors as their k selected values."""
    if method.name != "sift" or method.path != "simple":
        return trainable
    idx = flatten_paths(sift_jax.selected_indices(opt_state))
    out = {}
    for path, x in flatten_paths(trainable).items():
        i = idx.get(path)
        out[path] = x if i is None else x.reshape(-1)[i]
    return unflatten_paths(out)


def expand_trained(method, stored: Any, base_trainable: Any, opt_state: Any) -> Any:
    """Inverse of :func:`compact_trained`, given the base (pretrained) values."""
    if method.name != "sift" or method.path != "simple":
        return stored
    idx = flatten_paths(sift_jax.selected_indices(opt_state))
    stored_flat = flatten_paths(stored)
    out = {}
    for path, base in flatten_paths(base_trainable).items():
        i = idx.get(path)
        v = stored_flat[path]
        out[path] = v if i is None else base.reshape(-1).at[i].set(v).reshape(base.shape)
    return unflatten_paths(out)


class Checkpointer:
    """Saves and restores training state under ``<output_dir>/checkpoints``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, method, trainable, opt_state, rng, meta: dict, extra=None) -> None:
        payload = {
            "trained": _leaves_dict(compact_trained(method, trainable, opt_state)),
            "opt_state": _leaves_dict(opt_state),
            "rng": rng,
        }
        if extra:
            payload["extra"] = {k: _leaves_dict(v) for k, v in extra.items()}
        meta = {**meta, "extra_keys": sorted(extra) if extra else []}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(
        self,
        step: int,
        method,
        trainable_base,
        opt_state_template,
        rng_template,
        extra_template=None,
    ):
        """Returns ``(trainable, opt_state, rng, meta, extra)`` restored at ``step``.

        ``extra_template`` describes method state kept outside the optimizer (the compact SIFT
        path's indices); a saved selection-phase ``score`` is restored when present.
        """
        leaves, treedef = jax.tree.flatten(opt_state_template)
        abstract_opt = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        # The stored trainable tree's shapes depend on the indices; restore opt state first.
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        trained_abs = self._abstract_trained(method, trainable_base, opt_state_template)
        target = {
            "opt_state": abstract_opt,
            "rng": _abstract(rng_template),
            "trained": _leaves_dict(trained_abs),
        }
        keys = meta.get("extra_keys", [])
        if keys:
            extra_t = dict(extra_template or {})
            if "score" in keys:  # fp32 |g| accumulator shaped like the targeted tensors
                extra_t["score"] = jax.tree.map(
                    lambda w: jax.ShapeDtypeStruct(w.shape, jnp.float32, sharding=w.sharding),
                    method.frozen["w"],
                )
            extra_abs = {k: jax.tree.map(_abstract, extra_t[k]) for k in keys}
            target["extra"] = {k: _leaves_dict(v) for k, v in extra_abs.items()}
        tmp = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        opt_state = jax.tree.unflatten(treedef, [tmp["opt_state"][k] for k in sorted(abstract_opt)])
        trained = _from_leaves_dict(trained_abs, tmp["trained"])
        trainable = expand_trained(method, trained, trainable_base, opt_state)
        extra = None
        if keys:
            extra = {k: _from_leaves_dict(extra_abs[k], tmp["extra"][k]) for k in keys}
        return trainable, opt_state, tmp["rng"], meta, extra

    @staticmethod
    def _abstract_trained(method, trainable_base, opt_state):
        shapes = jax.eval_shape(
            lambda t, s: compact_trained(method, t, s), trainable_base, opt_state
        )
        base = flatten_paths(trainable_base)
        idx = (
            flatten_paths(sift_jax.selected_indices(opt_state))
            if method.path == "simple" and method.name == "sift"
            else {}
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        leaves = []
        for keypath, sds in flat:
            path = path_to_str(keypath)
            like = base[path] if idx.get(path) is None else idx[path]
            leaves.append(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=like.sharding))
        return jax.tree.unflatten(treedef, leaves)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
