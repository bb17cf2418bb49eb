"""Length-sorted batches under a token budget.

What a batch costs depends on the forward: a padded forward processes rows x longest row
tokens; an unpadded forward with variable-length attention processes only the real tokens.
`plan_batch` counts the one that the forward pays (`unpadded=True` for the second), so a varlen
model gets full batches instead of padded-size ones.

`BatchSource` hands batches out lazily, so a budget change after an OOM re-splits what is left.
"""

from __future__ import annotations

import threading

import numpy as np

# Re-exported: rag_clean_assets imports the budget store from here.
from rag_clean.encoders.base import EncoderError  # noqa: F401
from rag_clean.encoders.budget import BudgetStore  # noqa: F401


def batch_tokens(lengths: np.ndarray, unpadded: bool) -> int:
    """Tokens a forward processes for rows of `lengths` (longest first)."""
    if len(lengths) == 0:
        return 0
    return int(lengths.sum()) if unpadded else int(lengths.max()) * len(lengths)


def plan_batch(sorted_lengths: np.ndarray, start: int, budget: int, unpadded: bool = False) -> int:
    """End (exclusive) of the longest run from `start` that fits `budget`; at least one row.

    Rows are sorted by length descending, so a padded batch's width is its first row:
    padded tokens = rows x sorted_lengths[start]. Unpadded, the run's summed lengths count.
    """
    if not unpadded:
        width = max(int(sorted_lengths[start]), 1)
        return min(len(sorted_lengths), start + max(1, budget // width))
    # Every row costs at least one token, so no more than `budget` rows can fit.
    cumulative = np.cumsum(np.maximum(sorted_lengths[start:start + max(budget, 1)], 1))
    rows = int(np.searchsorted(cumulative, budget, side="right"))
    return start + max(1, rows)


def plan_batches(lengths: np.ndarray, budget: int, unpadded: bool = False) -> list[np.ndarray]:
    """All batches (row index arrays, longest first) for a fixed budget."""
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    out, i = [], 0
    while i < len(order):
        j = plan_batch(sorted_lengths, i, budget, unpadded)
        out.append(order[i:j])
        i = j
    return out


class BatchSource:
    """Thread-safe cursor over a window's rows sorted by length (longest first).

    `take(budget)` returns the next batch that fits `budget`; rows given back through
    `give_back` (after an OOM) are re-split and served first.
    """

    def __init__(self, lengths: np.ndarray, unpadded: bool = False, max_items: int | None = None):
        self.lengths = lengths
        self.unpadded = unpadded
        self.max_items = max_items  # an item cap on top of the token budget (rerank_batch_size)
        self.order = np.argsort(-lengths, kind="stable")
        self.sorted_lengths = lengths[self.order]
        self.cursor = 0
        self.retry: list[np.ndarray] = []
        self.lock = threading.Lock()

    def tokens(self, rows: np.ndarray) -> int:
        """What `rows` count against the budget."""
        return batch_tokens(self.lengths[rows], self.unpadded)

    def _end(self, sorted_lengths: np.ndarray, start: int, budget: int) -> int:
        end = plan_batch(sorted_lengths, start, budget, self.unpadded)
        return min(end, start + self.max_items) if self.max_items else end

    def take(self, budget: int) -> np.ndarray | None:
        with self.lock:
            if self.retry:
                rows = self.retry.pop()
                end = self._end(self.lengths[rows], 0, budget)
                if end < len(rows):
                    self.retry.append(rows[end:])
                return rows[:end]
            if self.cursor >= len(self.order):
                return None
            end = self._end(self.sorted_lengths, self.cursor, budget)
            rows = self.order[self.cursor:end]
            self.cursor = end
            return rows

    def give_back(self, rows: np.ndarray) -> None:
        with self.lock:
            self.retry.append(rows)
