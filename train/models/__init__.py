"""Flax NNX models that load real pretrained weights (no torch), in three layers.

Bottom, no model classes:

- :mod:`train.models.weights`: checkpoint files (HF directories / safetensors shards, GGUF
  files with dequantization, metadata and tokenizer), the HF <-> NNX name tables and hooks,
  strict matching and export of tensors.
- :mod:`train.models.registry`: the family declarations (``register_family``, ``family_for``).

Middle, the models (they import no loader):

- :mod:`train.models.layers`: NNX building blocks with logical axes.
- :mod:`train.models.encoder`: BERT / RoBERTa (``EncoderModel``,
  ``EncoderForSequenceClassification``, ``ClassifierApply``, ``mean_pool``); families ``bert``,
  ``roberta``, ``xlm-roberta``, ``camembert``.
- :mod:`train.models.decoder`: ``LlamaForCausalLM`` for the families ``llama``, ``qwen2``
  (q/k/v biases) and ``mistral`` (sliding window); ``DecoderApply``.
- :mod:`train.models.generate`: jitted KV-cache generation.
- :mod:`train.models.functional`: ``split_params`` / ``functional_apply`` / ``ModelApply``.
- :mod:`train.models.sharding`: logical axis rules -> ``NamedSharding`` trees.

Top, the loader:

- :mod:`train.models.pretrained`: ``load_pretrained`` (embedded / ``.gguf`` / HF dir / hub id)
  -> one ``Pretrained`` bundle (params, graphdef, config, tokenizer, apply function,
  ``shardings`` / ``place`` / ``export``).
"""
