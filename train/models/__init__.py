"""Flax NNX models that load real pretrained weights (no torch).

- :mod:`train.models.encoder`: BERT / RoBERTa (``EncoderModel``,
  ``EncoderForSequenceClassification``, ``mean_pool``).
- :mod:`train.models.decoder`: LLaMA family (``LlamaForCausalLM``, ``load_pretrained``).
- :mod:`train.models.generate`: jitted KV-cache generation.
- :mod:`train.models.hf`: HF directory / hub loading (``load_encoder``, ``load_llama``) and
  ``export_hf``; :mod:`train.models.gguf`: ``load_gguf``.
- :mod:`train.models.functional`: ``split_params`` / ``functional_apply`` for trainers.
- :mod:`train.models.sharding`: logical axis rules -> ``NamedSharding`` trees.
"""
