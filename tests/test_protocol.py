"""The message schema: what the parent accepts from a worker, and how a cut stream is split."""

from __future__ import annotations

import re

import orjson
import pytest

from contract import messages
from contract.recipe import Recipe
from contract.spec import ChainLink, SpecError, WorkerSpec


def test_round_trip_and_required_fields() -> None:
    line = messages.encode({"type": "error", "kind": "data", "message": "x"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert messages.decode(line)["kind"] == "data"
    with pytest.raises(messages.ProtocolError, match="lacks message"):
        messages.decode(b'{"type": "error", "kind": "data"}')


@pytest.mark.parametrize("line, match", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "gossip"}', "unknown message type"),
    (b'{"type": "hello", "version": 99, "pid": 1, "versions": {}, "device": "cpu"}', "protocol 99"),
])
def test_bad_lines_are_named(line: bytes, match: str) -> None:
    with pytest.raises(messages.ProtocolError, match=match):
        messages.decode(line)


def test_line_splitter_keeps_partial_lines_until_complete() -> None:
    splitter = messages.LineSplitter()
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.pending == b'{"b"'
    assert splitter.feed(b':2}\n\n') == [b'{"b":2}']
    assert splitter.pending == b""


def test_spec_round_trip() -> None:
    link = ChainLink(path="/m", kind="full", fingerprint="meta:1", bytes=3)
    recipe = Recipe(name="a", model="/m", dataset="/d.jsonl", batch_size=4)
    spec = WorkerSpec(recipe=recipe, chain=[link], dataset="/d.jsonl", device="cpu")
    again = WorkerSpec.from_json(spec.to_json())
    assert again == spec
    assert again.recipe.batch_size == 4 and again.chain[0].fingerprint == "meta:1"


@pytest.mark.parametrize(("change", "field"), [
    ({"device": "tpu"}, "device"),
    ({"recipe": {"name": "a", "model": "/m", "max_new_tokens": 0}}, "recipe.max_new_tokens"),
    ({"recipe": {"name": "a", "model": "/m", "temperature": 0.1}}, "recipe.temperature"),
    ({"chain": []}, "chain"),
    ({"surprise": 1}, "surprise"),
])
def test_the_worker_refuses_a_spec_with_a_bad_field_naming_it(change: dict, field: str) -> None:
    """The spec is validated by the worker before it imports torch: a bad field is named, never read as None."""
    link = ChainLink(path="/m", kind="full", fingerprint="meta:1", bytes=3)
    spec = WorkerSpec(recipe=Recipe(name="a", model="/m"), chain=[link], dataset="/d.jsonl", device="cpu")
    raw = {**orjson.loads(spec.to_json()), **change}
    with pytest.raises(SpecError, match=re.escape(field)):
        WorkerSpec.from_json(orjson.dumps(raw))


def test_a_spec_of_another_protocol_version_is_refused() -> None:
    link = ChainLink(path="/m", kind="full", fingerprint="meta:1", bytes=3)
    spec = WorkerSpec(recipe=Recipe(name="a", model="/m"), chain=[link], dataset="/d.jsonl", device="cpu")
    raw = {**orjson.loads(spec.to_json()), "protocol": messages.PROTOCOL_VERSION + 1}
    with pytest.raises(SpecError, match="protocol"):
        WorkerSpec.from_json(orjson.dumps(raw))
