"""Prompts by cross-attention, as in Stable Diffusion (SPEC §5, §7): a word tokenizer and a small transformer text
encoder turn a prompt into a context ``(B, L, d)`` that the U-Net's cross-attention reads.

- :class:`Tokenizer`: a fixed word vocabulary; a prompt is lower-cased, split on spaces and padded with
  :data:`PAD` to ``max_len`` tokens; the empty prompt is all padding.
- :class:`TextEncoder`: learned token and position embeddings, a pre-norm transformer encoder, a final LayerNorm:
  ``tokens (B, L) -> context (B, L, d)``.
- :class:`PromptUNet`: ``net(x, t, y)`` for a data set whose classes *are* prompts (:func:`class_prompts`:
  ``"3"`` for a digit, ``"3 then 7"`` for the two-digit canvas): the class index ``y`` is only used to look up
  its prompt's tokens; the U-Net gets no class embedding, so everything it knows of the condition comes through
  cross-attention to the encoded words. ``y = NULL_LABEL`` (and so classifier-free guidance's ∅, and the label
  dropout of training) is the empty prompt. With a one-word prompt the softmax over one key is 1 and
  cross-attention is an additive bias (tests/test_latent.py); the canvas's prompts need their word order.

Prompts outside the data set's class prompts cannot be asked for (there is no training signal for them): the
tokenizer's vocabulary is the words of the class prompts, and :meth:`PromptUNet.label_of` names the choices.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from difflab.networks.embeddings import NULL_LABEL

PAD = 0
"""The padding token; a prompt of only padding is the empty prompt, the null condition of CFG."""
CANVAS_DATASETS = {"mnist_pairs": lambda k: f"{k // 10} then {k % 10}"}
"""Data sets whose class ``k`` has a structured prompt; any other data set's class ``k`` is the word ``str(k)``."""


def class_prompts(dataset: str, num_classes: int) -> list[str]:
    """The prompt of each class of ``dataset``: ``"a then b"`` for the two-digit canvas, else the class number."""
    name = CANVAS_DATASETS.get(dataset, str)
    return [name(k) for k in range(num_classes)]


class Tokenizer:
    """Words -> ids ``1..V`` (0 is :data:`PAD`), prompts -> ``(B, max_len)`` long tensors."""

    def __init__(self, words: Sequence[str], max_len: int):
        self.vocab = ["<pad>", *sorted(set(words))]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    @classmethod
    def for_prompts(cls, prompts: Sequence[str]) -> "Tokenizer":
        """The vocabulary and length of a list of prompts."""
        split = [p.lower().split() for p in prompts]
        return cls([w for words in split for w in words], max(1, max(len(words) for words in split)))

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown or len(words) > self.max_len:
                raise ValueError(f"prompt {prompt!r}: {'unknown word ' + repr(unknown[0]) if unknown else 'too long'}"
                                 f" (words: {' '.join(self.vocab[1:])}; at most {self.max_len})")
            out[i, :len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return out


class TextEncoder(nn.Module):
    """``tokens (B, L) -> (B, L, dim)``: token + position embeddings, ``depth`` pre-norm transformer layers, LayerNorm."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, max_len: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens) + self.position[: tokens.shape[1]]  # (B, L, dim)
        return self.norm(self.encoder(h))


class PromptUNet(nn.Module):
    """A U-Net (built with ``context_dim = text encoder width`` and no classes) reading the prompt of class ``y``
    through cross-attention; ``y = NULL_LABEL`` or ``None`` is the empty prompt."""

    def __init__(self, unet: nn.Module, prompts: Sequence[str], dim: int, depth: int, num_heads: int):
        super().__init__()
        if getattr(unet, "num_classes", 0) or getattr(unet, "context_dim", None) != dim:
            raise ValueError(f"the prompt U-Net needs a U-Net without classes and with context_dim={dim}")
        self.unet, self.prompts = unet, list(prompts)
        self.tokenizer = Tokenizer.for_prompts(self.prompts)
        self.text = TextEncoder(len(self.tokenizer.vocab), dim, depth, num_heads, self.tokenizer.max_len)
        self.register_buffer("class_tokens", self.tokenizer.encode(self.prompts), persistent=False)  # (K, L)
        self.num_classes = len(self.prompts)

    def label_of(self, prompt: str) -> int:
        """The class whose prompt is ``prompt`` (tokenised alike); ``NULL_LABEL`` for the empty prompt."""
        tokens = self.tokenizer.encode([prompt])[0]
        if (tokens == PAD).all():
            return NULL_LABEL
        hits = (self.class_tokens.cpu() == tokens).all(1).nonzero()
        if not len(hits):
            raise ValueError(f"prompt {prompt!r} is not one this model was trained on (e.g. {self.prompts[-1]!r})")
        return int(hits[0])

    def context(self, y, batch: int, device) -> torch.Tensor:
        """The encoded prompts ``(B, L, dim)`` of labels ``y`` (``NULL_LABEL``: the empty prompt)."""
        if y is None:
            tokens = torch.full((batch, self.tokenizer.max_len), PAD, dtype=torch.long, device=device)
        else:
            y = torch.as_tensor(y, device=device).long().expand(batch)
            tokens = torch.where((y >= 0)[:, None], self.class_tokens[y.clamp(min=0)], PAD)  # (B, L)
        return self.text(tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        return self.unet(x, t, context=self.context(y, x.shape[0], x.device))
