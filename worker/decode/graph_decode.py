"""Decode steps replayed from a CUDA graph, each batch's first one checked bit for bit against the eager step.

A 7B's decode step was more of the host's time than of the GPU's: Python and about a thousand kernel launches a
step, about twice the GPU's own time. Recorded once as a
CUDA graph, a step is one launch. A graph replays fixed addresses and shapes, so the step must not grow its cache
by concatenation, nor read anything back to the host: within a `session` (one generate call) the decoder's first
decode step runs eagerly, as always; its cache is then moved into buffers as long as the answer can grow
(`_move_cache`), the step is recorded with the cache's `update` writing in place at a position the graph itself
advances and with flash-attn's kvcache kernel reading each row's keys [left padding, end)
(decode_attention.graph_step: the prompt's mask, only left padding and ones after it, says nothing more), and
replayed for that same first step. Where the replay's output is not bitwise the eager step's, or anything of the
step is not as recorded, the batch goes on eagerly and the session says why: a graph never changes an answer
silently. generate() itself is untouched (its logits processors, stopping and padding), as is the prefill; only the
decoder's forward for one new token is replaced.

On a CPU there is no graph: `EagerReplay` runs the recorded step again at each replay, on the same buffers, so
the tests exercise everything but the recording itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.decode import decode_attention


class CudaGraphReplay:
    """The step recorded as a CUDA graph, after a warm-up on the stream it is captured on (as torch's
    documentation asks: libraries initialise lazily per stream); one such stream a process."""

    _stream: Any = None

    def __init__(self) -> None:
        self._graph: Any = None
        self._output: Any = None
        if CudaGraphReplay._stream is None:
            CudaGraphReplay._stream = torch.cuda.Stream()

    def warm_up(self, step: Callable[[], Any]) -> None:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)

    def record(self, step: Callable[[], Any]) -> None:
        """capture_begin/end rather than torch.cuda.graph, which empties the device's and the pinned host
        memory's caches before each capture: the next prefill would allocate its memory again, and the prefetch
        thread its pinned buffers. thread_local: that thread pins the next batch's memory meanwhile
        (cudaHostAlloc), which in the default global mode invalidates the capture (seen on an H200); it never uses the
        stream being captured."""
        self._graph = torch.cuda.CUDAGraph()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._output = step()
            finally:
                self._graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    def replay(self) -> Any:
        self._graph.replay()
        return self._output


class EagerReplay:
    """The same contract without a GPU: recording runs nothing (as a capture executes nothing), a replay runs the
    step."""

    def __init__(self) -> None:
        self._step: Callable[[], Any] | None = None

    def warm_up(self, step: Callable[[], Any]) -> None:
        step()

    def record(self, step: Callable[[], Any]) -> None:
        self._step = step

    def replay(self) -> Any:
        assert self._step is not None
        return self._step()


@dataclass
class Outcome:
    """What one generate call's decode steps ran as: replayed from a graph, or eagerly and why."""

    replayed: bool = False
    declined: str | None = None  # why not replayed (None: replayed, or the batch had no decode step)
    inherent: bool = False  # the reason is the model's, not this batch's: its later batches are not attempted
    steps: int = 0  # decode steps replayed
    record_s: float = 0.0  # moving the cache, warm-up, recording and the checked first replay
    phases: dict[str, float] = field(default_factory=dict)  # record_s by phase: move, warm_up, capture, check


@dataclass
class _Recorded:
    replay: Any
    inputs: dict[str, torch.Tensor]  # the step's tensor arguments, copied in before each replay
    others: dict[str, Any]  # its other arguments, as recorded
    keys: list[torch.Tensor]  # per layer (batch, heads, capacity, dim)
    values: list[torch.Tensor]
    length: int  # tokens cached, as the host counts them
    position: torch.Tensor  # (1,) where the step writes its key: the step advances it
    ends: torch.Tensor  # (batch,) int32, each row's keys' end: the step advances them
    step: Callable[[], Any]  # the step as recorded, runnable eagerly
    verified: bool = False  # a replay has been checked against the same step run eagerly


@dataclass
class Session:
    """One generate call's decode steps: the first recorded (or declined), the later ones replayed while they
    match it (step_difference), else run eagerly."""

    capacity_left: int  # tokens the answer may still add after the prompt (generate's max_new_tokens)
    make_replay: Callable[[], Any]
    outcome: Outcome = field(default_factory=Outcome)
    recorded: _Recorded | None = None
    cache: Any = None
    done: bool = False  # recorded, or declined: the first decode step has been seen

    def step(self, forward: Callable[..., Any], kwargs: dict) -> Any:
        if not self.done:
            output = forward(**kwargs)  # the eager first step: the reference the replay must equal
            started = time.perf_counter()
            try:
                self._record(forward, kwargs, output)
            finally:
                self.outcome.record_s = time.perf_counter() - started
            return output
        recorded = self.recorded
        if recorded is None:
            return forward(**kwargs)
        difference = step_difference(recorded, kwargs, self.cache)
        if difference or recorded.length >= recorded.keys[0].shape[2]:
            self._decline(recorded, difference or "the cache is full")
            return forward(**kwargs)
        return self._replay(recorded, kwargs)

    def _record(self, forward: Callable[..., Any], kwargs: dict, reference: Any) -> None:
        self.done = True
        cache = _cache_of(kwargs)
        problem = _unrecordable(kwargs, cache)
        if problem is None and self.make_replay is CudaGraphReplay and not cache.layers[0].keys.is_cuda:
            problem = "the cache is not on a CUDA device"
        if problem:
            self.outcome.declined, self.outcome.inherent = problem, True
            return
        self.cache = cache
        last = [(layer.keys[:, :, -1:].clone(), layer.values[:, :, -1:].clone()) for layer in cache.layers]
        clock = _Clock(self.outcome.phases, cache.layers[0].keys)
        self.recorded = recorded = _recording(forward, kwargs, cache, self.capacity_left, self.make_replay())
        clock.lap("move")
        position, ends, step = recorded.position, recorded.ends, recorded.step
        cache.update = _writing_in_place(recorded, position)  # the instance's, for this session only
        try:
            recorded.replay.warm_up(step)
            position.fill_(recorded.length - 1)
            ends.fill_(recorded.length)
            clock.lap("warm_up")
            recorded.replay.record(step)
            clock.lap("capture")
            output = recorded.replay.replay()  # the first step again, now from the graph
        except torch.cuda.OutOfMemoryError:
            self._decline(recorded, "out of memory while recording", last)
            raise  # generate's caller halves the batch
        except _Unroutable as exc:
            self._decline(recorded, str(exc), last)
            self.outcome.inherent = True
            return
        except RuntimeError as exc:  # an operation a graph cannot record, or CUDA refusing the capture
            self._decline(recorded, f"{type(exc).__name__}: {exc}"[:300], last)
            return
        difference = _compare(reference, output)
        clock.lap("check")
        if difference:
            self._decline(recorded, f"the recorded step differs from the eager one ({difference})", last)
            return
        self.outcome.replayed = True

    def _replay(self, recorded: _Recorded, kwargs: dict) -> Any:
        for name, static in recorded.inputs.items():
            static.copy_(kwargs[name])
        output = recorded.replay.replay()
        recorded.length += 1
        if not recorded.verified:
            recorded.verified = True
            again = self._run_again(recorded, output)
            if again is not None:
                return again
        _show_length(self.cache, recorded)
        self.outcome.steps += 1
        return output

    def _run_again(self, recorded: _Recorded, output: Any) -> Any:
        """The first replay after the checked one, run again eagerly on the same buffers: the first check cannot
        see a value the recording froze (one the host computed, such as a position read off the cache's length),
        as it is right for the step recorded; one step later it is not. Returns the eager output where the two
        differ (and the session goes on eagerly), else None."""
        replayed = {k: v.clone() for k, v in output.items() if torch.is_tensor(v)}
        recorded.position.sub_(1)
        recorded.ends.sub_(1)
        again = recorded.step()  # writes the step's own keys over the replay's
        difference = _compare(again, replayed)
        if difference is None:
            return None
        self._decline(recorded, f"a replayed step differs from the same step run eagerly ({difference})")
        return again

    def _decline(self, recorded: _Recorded, reason: str,
                 last: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Go on eagerly from the cache as the eager steps left it (`last`: the first step's own keys, which the
        warm-up and the replay overwrote)."""
        self.recorded = None
        self.outcome.replayed = False
        self.outcome.declined = reason
        self.cache.__dict__.pop("update", None)
        if last is not None:
            for (key, value), keys, values in zip(last, recorded.keys, recorded.values, strict=True):
                keys[:, :, recorded.length - 1: recorded.length] = key
                values[:, :, recorded.length - 1: recorded.length] = value
        _show_length(self.cache, recorded)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.__dict__.pop("update", None)
        self.recorded = None  # the graph, its memory pool and the buffers go with it


class _Clock:
    """Seconds per phase of a recording, the device's queue drained at each lap (only while recording)."""

    def __init__(self, phases: dict[str, float], tensor: torch.Tensor) -> None:
        self.phases, self.cuda = phases, tensor.is_cuda
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 5)
        self.last = now


class _Unroutable(Exception):
    """A layer's attention did not take the kvcache kernel while the step was recorded."""


_session: Session | None = None
_attached: dict[int, Callable[[], Any]] = {}  # id(decoder) -> the replay factory of its sessions, while attached
_inherent: dict[int, str] = {}  # id(decoder) -> why its steps cannot be recorded, once a session found out


def attach(model: Any, replay: Callable[[], Any] = CudaGraphReplay) -> str | None:
    """Replay `model`'s decode steps from graphs within each `session`; None where attached, else why not. The
    steps' attention must be routed through decode_attention (flash_attention_2 and its kvcache kernel)."""
    decoder = _decoder(model)
    if decoder is None:
        return "no decoder module with layers found (get_decoder)"
    if id(decoder) in _attached:
        return None
    own = decoder.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        session = _session
        if session is None or args or not _is_decode_step(kwargs):
            return own(*args, **kwargs)
        return session.step(own, kwargs)

    decoder.forward = forward  # the instance's: nn.Module.__call__ finds it before the class's
    _attached[id(decoder)] = replay
    return None


def detach(model: Any) -> None:
    decoder = _decoder(model)
    if decoder is not None and _attached.pop(id(decoder), None) is not None:
        del decoder.forward
        _inherent.pop(id(decoder), None)


@contextmanager
def session(model: Any, max_new_tokens: int, routed: bool) -> Iterator[Outcome | None]:
    """Within, the decode steps of one generate call replay from a graph where `model` is attached and `routed`
    (decode_attention.left_padded yielded True); yields the outcome (None where not attempted)."""
    global _session
    decoder = _decoder(model) if routed else None
    replay = _attached.get(id(decoder)) if decoder is not None else None
    if replay is None:
        yield None
        return
    if id(decoder) in _inherent:
        yield Outcome(declined=_inherent[id(decoder)], inherent=True)
        return
    current = _session = Session(max_new_tokens, replay)
    try:
        yield current.outcome
    finally:
        _session = None
        current.close()
        if current.outcome.inherent and current.outcome.declined:
            _inherent[id(decoder)] = current.outcome.declined


def _decoder(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    getter = getattr(base, "get_decoder", None)
    try:
        decoder = getter() if getter is not None else None
    except (AttributeError, ValueError, NotImplementedError):
        return None
    return decoder if isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) else None


def _is_decode_step(kwargs: dict) -> bool:
    tokens = kwargs.get("inputs_embeds")
    tokens = kwargs.get("input_ids") if tokens is None else tokens
    cache = _cache_of(kwargs)
    return torch.is_tensor(tokens) and tokens.shape[1] == 1 and cache is not None and cache.get_seq_length() > 0


def _cache_of(kwargs: dict) -> Any:
    from transformers.cache_utils import Cache

    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


def _unrecordable(kwargs: dict, cache: Any) -> str | None:
    """Why this step cannot be recorded, or None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4
                         for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []})
        return f"the cache is not a plain dynamic cache ({type(cache).__name__} of {', '.join(kinds) or 'nothing'})"
    if len({(layer.keys.shape[0], layer.keys.shape[2]) for layer in layers}) != 1:
        return "the cache's layers differ in batch or length"
    mask = kwargs.get("attention_mask")
    if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
        return "the decoder was given a prepared mask"
    return None


def _recording(forward: Callable[..., Any], kwargs: dict, cache: Any, capacity_left: int, replay: Any) -> _Recorded:
    """The step to record: the cache moved into buffers as long as the answer can grow, the step's arguments as
    given (its mask left out), and where it writes and reads, which the step itself advances."""
    keys, values, length = _move_cache(cache, capacity_left)
    inputs = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v) and k != "attention_mask"}
    others = {k: v for k, v in kwargs.items() if not torch.is_tensor(v) and k != "attention_mask"}
    position = torch.full((1,), length - 1, dtype=torch.long, device=keys[0].device)
    ends = torch.full((keys[0].shape[0],), length, dtype=torch.int32, device=keys[0].device)
    capacity = keys[0].shape[2]

    def step() -> Any:
        with decode_attention.graph_step(ends, capacity) as routed:
            output = forward(**others, **inputs, attention_mask=None)
        position.add_(1)
        ends.add_(1)
        if routed.declined:
            raise _Unroutable(f"{routed.declined} is not a plain causal decode step for the kvcache kernel")
        return output

    return _Recorded(replay, inputs, others, keys, values, length, position, ends, step)


def _move_cache(cache: Any, extra: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The cache's keys and values into buffers `extra` tokens longer, one layer at a time (so that the old and
    the new copies of the whole cache never coexist); the cache then shows views of them."""
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    length = cache.layers[0].keys.shape[2]
    for layer in cache.layers:
        for old, kept in ((layer.keys, keys), (layer.values, values)):
            batch, heads, _, dim = old.shape
            buffer = old.new_empty((batch, heads, length + extra, dim))  # the kernel reads no further than ends
            buffer[:, :, :length] = old
            kept.append(buffer)
        layer.keys, layer.values = keys[-1][:, :, :length], values[-1][:, :, :length]
    return keys, values, length


def _writing_in_place(recorded: _Recorded, position: torch.Tensor) -> Callable[..., Any]:
    def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = recorded.keys[layer_idx], recorded.values[layer_idx]
        keys.index_copy_(2, position, key_states)
        values.index_copy_(2, position, value_states)
        return keys, values

    return update


def _show_length(cache: Any, recorded: _Recorded) -> None:
    """The cache's layers as views of the buffers up to the tokens cached: what get_seq_length (position ids,
    masks) and an eager step after a decline read."""
    for layer, keys, values in zip(cache.layers, recorded.keys, recorded.values, strict=True):
        layer.keys, layer.values = keys[:, :, :recorded.length], values[:, :, :recorded.length]


def step_difference(recorded: _Recorded, kwargs: dict, cache: Any) -> str | None:
    """How this step's arguments differ from the recorded step's, or None."""
    tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v) and k != "attention_mask"}
    if tensors.keys() != recorded.inputs.keys():
        return f"the step's tensor arguments changed ({sorted(tensors)} against {sorted(recorded.inputs)})"
    for name, value in tensors.items():
        static = recorded.inputs[name]
        if value.shape != static.shape or value.dtype != static.dtype or value.device != static.device:
            return f"the step's {name} changed shape or type ({tuple(value.shape)} against {tuple(static.shape)})"
    others = {k: v for k, v in kwargs.items() if not torch.is_tensor(v) and k != "attention_mask"}
    if others.keys() != recorded.others.keys() or any(
            others[k] is not v and others[k] != v for k, v in recorded.others.items()):
        return "the step's other arguments changed"
    if _cache_of(kwargs) is not cache:
        return "the step was given another cache"
    return None


def _compare(reference: Any, output: Any) -> str | None:
    """Where the replayed step's output differs from the eager one's, or None (equal bit for bit)."""
    names = [k for k, v in reference.items() if torch.is_tensor(v)]
    for name in names:
        mine, theirs = output.get(name), reference[name]
        if not torch.is_tensor(mine) or mine.shape != theirs.shape:
            return f"{name}: not of the same shape"
        if not torch.equal(mine, theirs):
            gap = (mine.float() - theirs.float()).abs().max().item()
            return f"{name}: largest difference {gap:.3g}"
    return None if names else "the step's output holds no tensors"
