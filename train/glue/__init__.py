"""``python -m train.glue``: SIFT / full / LoRA fine-tuning of BERT/RoBERTa encoders on GLUE.

With no arguments it runs the embedded default, offline: the packaged pretrained MiniLM-L6
BERT fine-tuned on the packaged Rotten-Tomatoes review sentences (task ``mr``) with SIFT at
rate 0.008 on attention query/key/value/output, classifier dense (the paper's GLUE recipe at
small scale). The paper's setting for a real GLUE task::

    python -m train.glue --model_name_or_path roberta-large --task_name rte \\
        --learning_rate 7e-5 --num_train_epochs 20 --per_device_train_batch_size 32 \\
        --max_seq_length 512 --sparse_rate 0.008 --weight_decay 0.1 --warmup_ratio 0.06

Outputs in ``--output_dir``: ``eval_results.json``, ``all_results.json``, ``train_log.jsonl``,
``sift_delta.safetensors`` (SIFT), ``model/`` (the merged model as an HF directory) and
``checkpoints/``.
"""

from train.glue.task import GlueConfig, GlueDataConfig, build_task, main, run

__all__ = ["GlueConfig", "GlueDataConfig", "build_task", "main", "run"]
