"""The trainer core every job shares.

- :mod:`~train.core.config`: typed config sections and the flag parser;
- :mod:`~train.core.task`: the :class:`~train.core.task.Task` a job hands to the loop;
- :mod:`~train.core.methods`: the :class:`~train.core.methods.base.Method` interface and
  registry (``full``, ``lora``, ``sift``: SIFT as glue over :mod:`sift_jax.compact`);
- :mod:`~train.core.steps`: the jitted step builders (also what ``bench/`` compiles);
- :mod:`~train.core.fit`: the fit loop, its hooks and the shared epilogue;
- :mod:`~train.core.checkpoint`: orbax checkpoints verified by checksums;
- :mod:`~train.core.outputs`: the locked output directory, atomic files, the completion
  marker; :mod:`~train.core.cli`: one-line errors for users;
- :mod:`~train.core.mesh`: processes, the device mesh, batch placement;
- :mod:`~train.core.optim`: AdamW, the schedule, the non-finite step guard;
  :mod:`~train.core.logs`: logging on process 0.
"""
