"""jaxft: fine-tune pretrained Hugging Face models in JAX."""

__version__ = "0.1.0"
