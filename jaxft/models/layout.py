"""Where a model family keeps its parts, in the HF-style dotted names everything user-facing speaks (PEFT
files, trainable patterns, FLOP counts): every model class has a `LAYOUT`.

Decoders name their parts as Llama does (`model.layers.3.self_attn.o_proj`); GPT-2 and BERT name theirs
otherwise (`transformer.h.3.attn.c_proj`, `bert.encoder.layer.3.attention.output.dense`). Code that must find
"the blocks", "the embeddings" or "the head" asks the layout instead of spelling Llama's names.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Layout:
    blocks: str = "model.layers"  # block i's parts are "<blocks>.<i>.<part>"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # the input embeddings (tokens, positions, types)
    final_norm: str | None = "model.norm"  # the norm over the last block's output; None where there is none
    lm_head: str = "lm_head"  # the untied language-model head
    classifier: str = "score"  # a sequence classifier's head (a prefix: it may hold several modules)
    # The last projection of each sublayer, whose output bottleneck adapters adapt (Houlsby: both, Pfeiffer: MLP).
    attention_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"

    def block_of(self, name: str) -> tuple[int, str] | None:
        """(block index, the name within the block) of a parameter or module name in a block, else None."""
        match = re.fullmatch(rf"{re.escape(self.blocks)}\.(\d+)\.(.+)", name)
        return None if match is None else (int(match.group(1)), match.group(2))

    def blocks_pattern(self, indices) -> str:
        """A regex matching every name inside the blocks `indices`."""
        return rf"{re.escape(self.blocks)}\.({'|'.join(str(i) for i in indices)})\..*"

    def embedding_tensor(self) -> str:
        """The HF tensor of the token embedding (what a tied head reads)."""
        return f"{self.embeddings[0]}.weight"


DECODER = Layout()


def of(model) -> Layout:
    """The layout of `model` or model class (Llama's for one that declares none)."""
    return getattr(model if isinstance(model, type) else type(model), "LAYOUT", DECODER)
