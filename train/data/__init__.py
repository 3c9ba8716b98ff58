"""Task data for the trainers.

Modules (import the one you need; none is imported here, to keep ``import train.data`` cheap):

* :mod:`train.data.assets` -- embedded offline assets (MiniLM, SmolLM2 GGUF, review sentences);
* :mod:`train.data.mr` -- the embedded ``mr`` / ``mr-reg`` movie-review task and its fixed split;
* :mod:`train.glue.data` -- GLUE registry, loaders (hub, GLUE TSV dir, csv/json), metrics;
* :mod:`train.glue.batching` -- tokenization, resumable seeded batches, masked eval batches.
"""
