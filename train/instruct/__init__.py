"""``python -m train.instruct``: SIFT instruction tuning of a LLaMA-family decoder.

The paper's second experiment (Alpaca -> Llama, SIFT rate 0.05 on the q/k/v/o/gate/up/down
projections, nothing dense, AdamW lr 2e-4, warmup 0.03), on the trainer shared with
``train.glue``: same flags (:class:`InstructConfig` extends :class:`train.core.config.TrainConfig`),
same methods (``--finetuning_type sift | full | lora``), checkpoints and resume.

Data: ``--data_path`` Alpaca-format (``instruction``/``input``/``output``) or chat-format
(``messages``) JSON/JSONL, loss on response tokens only (:mod:`train.instruct.data`). With no
``--data_path`` the run is the offline demo: an instruction set built from the packaged
movie-review sentences ("Classify the sentiment of this movie review as positive or
negative." -> ``positive`` / ``negative``), scored before and after tuning by comparing the
next-token logits of the two answers after the prompt. ``--mmlu_dir`` adds an MMLU evaluation
(:mod:`train.mmlu`) before and after. With SIFT the learned increments are saved as
``<output_dir>/sift_delta.safetensors`` for ``python -m train.generate --delta``.

Example:
    python -m train.instruct                                  # offline demo, SmolLM2-135M
    # (measured: 2-core CPU, see docs/instruct.md for the numbers and the Llama-7B recipe)
    python -m train.instruct --data_path alpaca_data.json --mmlu_dir data/mmlu \\
        --num_train_epochs 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 32 \\
        --model_max_length 512 --output_dir outputs/alpaca
"""

from train.instruct.task import InstructConfig, InstructDataConfig, build_task, main, run

__all__ = ["InstructConfig", "InstructDataConfig", "build_task", "main", "run"]
