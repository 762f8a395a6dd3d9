"""Text generation: `decode.py` decodes (prefill, then a jitted loop over a KV cache), `prompts.py` turns
text, chat turns and dataset rows into prompt tokens as training tokenised them, `load.py` loads a model with
its fine-tuning (a PEFT adapter, a run's workdir), and `python -m jaxft.generate` is the command line."""

from jaxft.generate.decode import Generation, GenerationConfig, generate, generate_in_batches, left_pad

__all__ = ["Generation", "GenerationConfig", "generate", "generate_in_batches", "left_pad"]
