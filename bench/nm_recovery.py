"""2:4 quality beyond one-shot: refinement and low-rank compensation (EoRA), on real and trained models.

Two models, one run, every row against the dense model on held-out text:

* all-MiniLM-L6-v2 (real weights), calibrated on sentences from the Python standard library's
  docstrings (text every machine with Python has), evaluated on other such sentences: mean cosine of
  the pooled embeddings to the dense model's;
* a LLaMA-shaped causal LM (byte-level, 4 blocks) trained here for a few hundred steps on those
  docstrings, evaluated by perplexity on held-out docstrings.

Rows: one-shot magnitude, Wanda, SparseGPT; each with ``refine=True``; refined SparseGPT plus
``LowRankCompensation`` at several ranks (added parameters as a share of the masked layers'); the
pass time of each.  On MiniLM also learned masks (``graphprune.train.LearnedMasks``, cosine
distillation on 1024 training sentences, train and held-out figures), starting from refined
SparseGPT masks over the dense weights, and over SparseGPT's refined weights
(``learned_weights="prior"``).

    python -m bench.nm_recovery [--quick]
"""

from __future__ import annotations

import ast
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import transformers as T

import graphprune as gp
from bench.learned_masks import learn
from graphprune.frontends.torch.lowrank import low_rank_paths
from graphprune.frontends.torch.masks import masked_weights
from graphprune.passes import LowRankCompensation, NMSparsity
from samples.minilm import build, embed, tokenize

RANKS = (8, 32, 64)
LEARNING_STEPS = 100
# what learned masks start over, and LearnedMasks options: the default schedule, and one that holds the
# refined start (a strong prior, a cool start) instead of sampling far from it at first
LEARNED = (("dense", {}), ("prior", {}), ("prior", {"prior_strength": 10.0, "temperature": (0.5, 0.05)}))


def docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library's top-level ``.py``
    files, in file order (read with ``ast``: nothing is imported)."""
    folder = os.path.dirname(os.__file__)
    texts = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as f:
            try:
                tree = ast.parse(f.read())
            except SyntaxError:
                continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if (doc := ast.get_docstring(node)) and len(doc) > 80:
                    texts.append(" ".join(doc.split()))
    return texts


def sentences(texts: list[str]) -> list[str]:
    """Plain English sentences of 40 to 160 characters from ``texts``."""
    out = []
    for text in texts:
        for s in text.split(". "):
            if 40 <= len(s) <= 160 and s[0].isupper() and sum(c.isalpha() or c == " " for c in s) > 0.9 * len(s):
                out.append(s.rstrip(".") + ".")
    return out


def row(label: str, quality: float, unit: str, added: str, seconds: float) -> None:
    print(f"  {label:<34}{quality:>10.3f} {unit:<8}{added:>12}{seconds:>9.1f}")


def pipelines() -> list[tuple[str, list]]:
    rows: list[tuple[str, list]] = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        rows.append((method, [NMSparsity(2, 4, method=method)]))
        rows.append((method + ", refined", [NMSparsity(2, 4, method=method, refine=True)]))
    for rank in RANKS:
        rows.append(
            (
                f"sparsegpt, refined + rank {rank}",
                [NMSparsity(2, 4, method="sparsegpt", refine=True), LowRankCompensation(rank)],
            )
        )
    return rows


def added(result: gp.PruneResult) -> str:
    """Parameters the low-rank paths add, as a share of the masked layers' weights."""
    paths = low_rank_paths(result.module)
    extra = sum(p.down.weight.numel() + p.up.weight.numel() for p in paths.values())
    masked = sum(t.numel() for t, _ in masked_weights(result.module).values())
    return f"{extra / masked:.1%}" if extra else "-"


@dataclass
class MiniLMData:
    """all-MiniLM-L6-v2 and batches of docstring sentences: calibration (the first of the training
    sentences), held out (the last of them all) and training, 32 sentences a batch."""

    model: torch.nn.Module
    calibration: list[dict]
    held: list[dict]
    train: list[dict]

    @classmethod
    def of(cls, texts: list[str], quick: bool) -> "MiniLMData":
        model, _ = build()
        pool_ = sentences(texts)
        train = pool_[: 256 if quick else 1024]
        calibration, held = train[: 64 if quick else 256], pool_[-64:]
        return cls(model=model, calibration=_batches(calibration), held=_batches(held), train=_batches(train))

    def sentence_counts(self) -> tuple[int, int, int]:
        return tuple(sum(len(b["input_ids"]) for b in part) for part in (self.calibration, self.held, self.train))


def _batches(texts: list[str]) -> list[dict]:
    return [tokenize(texts[i : i + 32]) for i in range(0, len(texts), 32)]


def cosine(m: torch.nn.Module, batches: list[dict], against: list[torch.Tensor]) -> float:
    """Mean cosine of ``m``'s pooled embeddings of ``batches`` to the embeddings ``against``."""
    return sum((embed(m.eval(), b) * d).sum(-1).mean().item() for b, d in zip(batches, against)) / len(batches)


def minilm(texts: list[str], quick: bool) -> None:
    data = MiniLMData.of(texts, quick)
    model, calibration, held, train = data.model, data.calibration, data.held, data.train
    dense = [embed(model, b) for b in held]
    targets = [embed(model, b) for b in train]
    calibration_count, held_count, _ = data.sentence_counts()

    print(
        f"all-MiniLM-L6-v2: 2:4 on the 36 encoder linears; {calibration_count} calibration sentences, "
        f"{held_count} held out (standard-library docstrings)"
    )
    print(f"  {'pipeline':<34}{'held-out':>10} {'':<8}{'added':>12}{'seconds':>9}")
    for label, passes in pipelines():
        start = time.perf_counter()
        result = gp.prune(model, calibration[0], passes=passes, calibration=calibration)
        seconds = time.perf_counter() - start
        row(label, cosine(result.module, held, dense), "cosine", added(result), seconds)
        if label == "sparsegpt, refined":
            print(f"    (train cosine {cosine(result.module, train, targets):.3f})")
    steps = 40 if quick else LEARNING_STEPS
    for weights, schedule in LEARNED:
        start = time.perf_counter()
        prior = NMSparsity(2, 4, method="learned", prior="sparsegpt", refine=True, learned_weights=weights)
        sparse = gp.prune(model, calibration[0], passes=[prior], calibration=calibration).module
        learned = learn(sparse, train, targets, steps, **schedule)
        seconds = time.perf_counter() - start
        label = f"learned over {weights} weights" + (", held prior" if schedule else "")
        row(f"{label}, {steps} steps", cosine(learned, held, dense), "cosine", "-", seconds)
        print(f"    (train cosine {cosine(learned, train, targets):.3f})")


@dataclass
class ByteLM:
    """A byte-level LLaMA trained here on the docstrings, with its held-out windows and calibration."""

    model: T.LlamaForCausalLM
    train: torch.Tensor  # the training bytes
    windows: torch.Tensor  # held-out windows, [count, length]
    calibration: list[dict]
    steps: int
    seconds: float

    def perplexity(self, m: torch.nn.Module) -> float:
        with torch.no_grad():
            losses = [m(input_ids=w[None], labels=w[None]).loss.item() for w in self.windows]
        return math.exp(sum(losses) / len(losses))


def byte_lm(texts: list[str], quick: bool, layers: int = 4, hidden: int = 256, intermediate: int = 688) -> ByteLM:
    """Train the byte-level LM (100 steps with ``quick``, else 600) on 95% of ``texts``."""
    data = torch.tensor(list("\n".join(texts).encode("utf-8", errors="ignore")), dtype=torch.long)
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split:]
    config = T.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    length, batch, steps = 128, 16, 100 if quick else 600
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - length - 1, (batch,), generator=generator)
        ids = torch.stack([train[s : s + length] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    trained = time.perf_counter() - start
    windows = held[: (len(held) // length) * length].reshape(-1, length)[:64]
    calibration = [
        {
            "input_ids": torch.stack(
                [train[s : s + length] for s in torch.randint(0, split - length, (16,), generator=generator)]
            )
        }
        for _ in range(2 if quick else 8)
    ]
    return ByteLM(model=model, train=train, windows=windows, calibration=calibration, steps=steps, seconds=trained)


def causal_lm(texts: list[str], quick: bool) -> None:
    lm = byte_lm(texts, quick)
    model, calibration, windows, perplexity = lm.model, lm.calibration, lm.windows, lm.perplexity
    steps, trained, length = lm.steps, lm.seconds, windows.shape[1]

    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nLLaMA-shaped causal LM, {params / 1e6:.1f}M parameters, byte-level, trained {steps} steps in "
        f"{trained:.0f} s; 2:4 on the 28 block linears; {len(calibration) * 16} x {length}-byte calibration "
        f"windows, {len(windows)} held-out windows"
    )
    print(f"  {'pipeline':<34}{'held-out':>10} {'':<8}{'added':>12}{'seconds':>9}")
    row("dense", perplexity(model), "ppl", "-", 0.0)
    ids = calibration[0]
    for label, passes in pipelines():
        start = time.perf_counter()
        result = gp.prune(model, ids, passes=passes, calibration=calibration)
        seconds = time.perf_counter() - start
        row(label, perplexity(result.module), "ppl", added(result), seconds)


def main(quick: bool = False) -> None:
    texts = docstrings()
    minilm(texts, quick)
    causal_lm(texts, quick)


if __name__ == "__main__":
    main("--quick" in sys.argv)
