"""The data pipeline: HF datasets in, clean (optionally packed) per-process batches out.

`load(config, tokenizer)` is the entry point; `python -m jaxft.data --config ... --show 3`
prints rendered examples and the data report without training. pipeline.py lists
the stages and the module that holds each.
"""

from jaxft.data.batches import Prefetcher, TrainOrder, eval_batches, pad_batch, to_global
from jaxft.data.encode import Examples
from jaxft.data.pipeline import Data, TrainSet, eval_column, load, pad_token_id, split_off_eval

__all__ = ["Data", "Examples", "Prefetcher", "TrainOrder", "TrainSet", "eval_batches", "eval_column", "load",
           "pad_batch", "pad_token_id", "split_off_eval", "to_global"]
