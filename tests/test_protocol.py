"""The message schema: what the parent accepts from a worker, and how a cut stream is split."""

from __future__ import annotations

import pytest

from orchestrator import protocol


def test_round_trip_and_required_fields() -> None:
    line = protocol.encode({"type": "error", "kind": "data", "message": "x"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line)["kind"] == "data"
    with pytest.raises(protocol.ProtocolError, match="lacks message"):
        protocol.decode(b'{"type": "error", "kind": "data"}')


@pytest.mark.parametrize("line, match", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"type": "gossip"}', "unknown message type"),
    (b'{"type": "hello", "version": 99, "pid": 1, "versions": {}, "device": "cpu"}', "protocol 99"),
])
def test_bad_lines_are_named(line: bytes, match: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=match):
        protocol.decode(line)


def test_line_splitter_keeps_partial_lines_until_complete() -> None:
    splitter = protocol.LineSplitter()
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.pending == b'{"b"'
    assert splitter.feed(b':2}\n\n') == [b'{"b":2}']
    assert splitter.pending == b""


def test_spec_round_trip() -> None:
    link = protocol.ChainLink(path="/m", kind="full", fingerprint="meta:1", bytes=3)
    spec = protocol.WorkerSpec(recipe={"name": "a"}, chain=[link], dataset="/d.jsonl", device="cpu")
    assert protocol.WorkerSpec.from_json(spec.to_json()) == spec
