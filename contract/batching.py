"""How the worker cuts a recipe's samples into batches, and so how large its largest batch is: one rule, read by the
worker (inference/infer.py) and by the parent's memory estimate, which must count the batch the worker will run, not
the batch_size asked for (32 samples at batch 24 run as 16 + 16: estimated at 24, InternVL was 47% over)."""

from __future__ import annotations

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


def largest_batch(samples: int, size: int) -> int:
    """The largest batch the worker forms for `samples` samples at batch_size `size` (size itself when the count
    is unknown, 0): full windows, then what is left."""
    if samples <= 0:
        return size
    window = window_size(size)
    counts = [min(samples, window)] + ([samples % window] if samples > window and samples % window else [])
    return max(end - start for count in counts for start, end in even_bounds(count, size))
