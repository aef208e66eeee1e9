"""How the worker cuts a recipe's samples into batches, and so how large its largest batch is: one rule, read by the
worker (inference/infer.py) and by the parent's memory estimate, which must count the batch the worker will run, not
the batch_size asked for (32 samples at batch 24 run as 16 + 16: estimated at 24, InternVL was 47% over)."""

from __future__ import annotations

from collections import Counter

SORT_WINDOW = 4  # batches' worth of samples sorted together: padding stays low, memory bounded
MIN_WINDOW = 256


def window_size(size: int) -> int:
    """How many samples the worker reads, sorts by prompt length and cuts into batches at once."""
    return max(MIN_WINDOW, size * SORT_WINDOW)


def even_bounds(count: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of the batches of at most `size` that `count` samples are cut into, as even as possible (200 at
    64: 50, 50, 50, 50, not 64, 64, 64, 8): the same number of generate calls, less padding and memory in each."""
    batches = -(-count // size) if count else 0
    return [(index * count // batches, (index + 1) * count // batches) for index in range(batches)]


def batch_counts(samples: int, size: int) -> dict[int, int]:
    """How many batches of each size the worker forms for `samples` samples at batch_size `size`: full windows,
    then what is left (200 at 199: {100: 2}, the batch that runs, not the size asked for)."""
    full_windows, rest = divmod(samples, window_size(size))
    counts: Counter[int] = Counter()
    for count, times in ((window_size(size), full_windows), (rest, 1)):
        for start, end in even_bounds(count, size) if times else []:
            counts[end - start] += times
    return dict(counts)


def largest_batch(samples: int, size: int) -> int:
    """The largest batch the worker forms for `samples` samples at batch_size `size` (size itself when the count
    is unknown, 0)."""
    return max(batch_counts(samples, size)) if samples > 0 else size
