"""LoRA fine-tuning of a Llama-family checkpoint (Llama 2/3, Mistral, Qwen2, Qwen3).

    python -m jaxft.train --config configs/llama_lora.py --workdir runs/llama \
        --config.model.path=/models/Llama-3.2-1B \
        --config.data.train=train.jsonl --config.data.eval=eval.jsonl \
        --config.peft.rank=16 --config.optim.lr=2e-4 --config.train.steps=1000

Data: JSONL/JSON/CSV/Parquet/Arrow files, globs, save_to_disk directories or hub ids,
in text, prompt_completion, messages (chat) or classification format (README, "Data");
`python -m jaxft.data --config configs/llama_lora.py ... --show 3` previews it.
The adapter lands in <workdir>/export/adapter in PEFT format.
"""

from jaxft.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    # model.path and data.train have no sensible default: the run stops and asks for them.
    c.model.dtype = "bfloat16"  # compute in bf16; LoRA weights and optimizer state stay float32
    c.model.param_dtype = "bfloat16"  # frozen base weights stored in bf16: half the memory
    c.data.eval_fraction = 0.0

    c.peft.method = "lora"
    c.peft.rank = 16
    c.peft.alpha = 32.0
    c.peft.dropout = 0.05
    c.peft.targets = "all-linear"

    c.optim.name = "adamw"
    c.optim.lr = 2e-4
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.seq_len = 1024
    c.train.log_every_steps = 10
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return c
