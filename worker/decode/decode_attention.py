"""Decode steps that attend over a left-padded KV cache in place, without the host waiting for the GPU.

transformers' flash_attention_2 handles a padded batch by unpadding it: at every layer of every decode step it
finds the cache's real tokens (torch.nonzero), reads their longest length back to the host (.item()), gathers
every cached key and value into a packed copy and scatters the output back. The two reads make the host wait for
the GPU twice a layer, so host and GPU take turns instead of overlapping (this way halves a 7B's decode step at a large
batch of prompts of different lengths; a batch without padding takes transformers' dense path either way). flash-attn's
kvcache kernel reads the padded cache as it lies:
row i attends to keys [cache_leftpad[i], cache_seqlens[i]). A prompt padded on the left stays so through decoding
(generate appends ones to the mask), so the pads are counted once, before the first step, from the prompt's mask.

Only what is certainly such a step takes this way: one query token, a causal self-attention layer, a mask as long
as the cache (or none, where no row is padded), within `left_padded` for a batch of that size. The prefill, a
vision tower, cross-attention, sliding-window or soft-capped layers, a static cache and everything else go to
transformers' own function. A step being recorded for replay (`graph_step`, worker/decode/graph_decode.py) has no mask
and a cache longer than its keys: each row's end then comes from the recording, not from the cache's length.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

KVCACHE = "kvcache"
TRANSFORMERS = "transformers"

_replaced: dict[str, Callable] = {}  # attention implementation -> transformers' own function, while routed
_kernel_calls = 0  # layer calls that went to the kernel, recordings included (a replayed graph runs no Python)


@dataclass
class _GraphStep:
    """A decode step being recorded: the cache is `capacity` tokens long whatever it holds, each row's keys end at
    `ends` (a device tensor the graph advances), and there is no mask."""

    ends: torch.Tensor
    capacity: int
    declined: str | None = None  # the first call the kvcache kernel could not take


@dataclass
class _Batch:
    leftpad: torch.Tensor  # int32 (batch,): each row's padding, on the device
    unpadded: bool = False  # no row is padded: transformers passes no mask at all then
    _ends: tuple[int, torch.Tensor] | None = field(default=None)  # the step's cache length and its (batch,) copy
    graph: _GraphStep | None = None  # while a step is recorded for replay (worker/decode/graph_decode.py)

    def ends(self, length: int) -> torch.Tensor:
        """Every row's cache ends at `length` (the mask's width): one small tensor a step, shared by its layers."""
        if self._ends is None or self._ends[0] != length:
            self._ends = (length, torch.full_like(self.leftpad, length))
        return self._ends[1]


_active: _Batch | None = None


def flash_kvcache_kernel() -> Callable | None:
    """flash-attn's kvcache function where it takes cache_leftpad (flash-attn 2.6 and later), else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    if "cache_leftpad" not in inspect.signature(flash_attn_with_kvcache).parameters:
        return None
    return flash_attn_with_kvcache


def install(implementation: str = "flash_attention_2", kernel: Callable | None = None,
            dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> bool:
    """Route this process's single-token decode steps of `implementation` to `kernel` (flash-attn's kvcache
    function by default), for queries of `dtypes` (flash-attn's); False, and nothing changed, where there is no
    such kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in _replaced:
        return True
    kernel = kernel or flash_kvcache_kernel()
    if kernel is None:
        return False
    original = ALL_ATTENTION_FUNCTIONS[implementation]

    def routed(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        global _kernel_calls
        batch = _active
        if batch is not None and batch.graph is not None:
            if query.dtype not in dtypes or not _recordable_step(batch, batch.graph, module, query, key, value, kwargs):
                batch.graph.declined = batch.graph.declined or f"layer {getattr(module, 'layer_idx', '?')}'s attention"
                return original(module, query, key, value, attention_mask, **kwargs)
            ends = batch.graph.ends
        elif (batch is None or query.dtype not in dtypes
                or not _in_place_step(batch, module, query, key, value, attention_mask, kwargs)):
            return original(module, query, key, value, attention_mask, **kwargs)
        else:
            ends = batch.ends(key.shape[2])
        # transformers' layout is (batch, heads, tokens, dim); flash-attn's (batch, tokens, heads, dim): views.
        # One split of the keys, whatever the cache's length: the kernel's own choice depends on the cache's
        # allocated length, which differs between an eager step and a recorded one, and so would its rounding
        _kernel_calls += 1
        out = kernel(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                     cache_seqlens=ends, cache_leftpad=batch.leftpad,
                     softmax_scale=kwargs.get("scaling"), causal=True, num_splits=1)
        return out, None

    ALL_ATTENTION_FUNCTIONS[implementation] = routed
    _replaced[implementation] = original
    return True


def kernel_calls() -> int:
    """How many layer calls of this process attended through the kernel: where the route is installed but never
    taken (every batch unpadded on the right, say), decode runs transformers' slower path, and this says so."""
    return _kernel_calls


def uninstall() -> None:
    """transformers' own functions back (tests)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for implementation, original in _replaced.items():
        ALL_ATTENTION_FUNCTIONS[implementation] = original
    _replaced.clear()


def _in_place_step(batch: _Batch, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A decode step of the batch `left_padded` announced, on a cache laid out as generate's dynamic cache lays
    it out (the mask exactly as long as the keys), in a layer with nothing the kvcache call is not told of."""
    masked = attention_mask.shape[-1] == key.shape[2] if attention_mask is not None else batch.unpadded
    return masked and _plain_step(batch, module, query, key, value, kwargs)


def _recordable_step(batch: _Batch, graph: _GraphStep, module: Any, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, kwargs: dict) -> bool:
    """A decode step being recorded: the keys are the whole buffer the recorded cache writes in place."""
    return key.shape[2] == graph.capacity and _plain_step(batch, module, query, key, value, kwargs)


def _plain_step(batch: _Batch, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kwargs: dict) -> bool:
    return (query.shape[2] == 1 and query.shape[0] == batch.leftpad.shape[0] == key.shape[0]
            and getattr(module, "is_causal", False) is True
            and query.shape[-1] == value.shape[-1]
            and not kwargs.get("dropout") and kwargs.get("sliding_window") is None and not kwargs.get("softcap")
            and kwargs.get("s_aux") is None and kwargs.get("output_attentions") is not True
            and all(kwargs.get(name) is None for name in ("cu_seq_lens_q", "cu_seq_lens_k", "block_table")))


def left_padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's count of padding where every row is padded on the left only (zeros, then ones); else None."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask.to("cpu", torch.int64)
    pads = mask.shape[1] - mask.sum(dim=1)
    expected = torch.arange(mask.shape[1]).unsqueeze(0) >= pads.unsqueeze(1)
    return pads if bool(torch.equal(mask.bool(), expected)) else None


@contextmanager
def left_padded(attention_mask: torch.Tensor | None, device: str) -> Iterator[bool]:
    """Within, the decode steps of the batch whose prompt mask this is attend over its cache in place, if the
    routing is installed and the prompt is padded on the left only; yields whether they do."""
    global _active
    pads = left_padding(attention_mask) if _replaced else None
    if pads is None:
        yield False
        return
    previous, _active = _active, _Batch(pads.to(device=device, dtype=torch.int32), unpadded=int(pads.max()) == 0)
    try:
        yield True
    finally:
        _active = previous


@contextmanager
def graph_step(ends: torch.Tensor, capacity: int) -> Iterator[_GraphStep]:
    """Within `left_padded`, the decode step being recorded attends over a cache of `capacity` tokens, each row
    ending at `ends`; the yielded record says whether some layer could not take the kvcache kernel."""
    step = _GraphStep(ends, capacity)
    batch = _active
    if batch is None:
        step.declined = "no left-padded batch announced"
        yield step
        return
    batch.graph = step
    try:
        yield step
    finally:
        batch.graph = None
