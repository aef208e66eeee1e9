"""Bytes for people: one rule everywhere (binary units, as NVML and nvidia-smi count GPU memory)."""

from __future__ import annotations

GIB = 2**30
MIB = 2**20


def format_bytes(count: int | float) -> str:
    """4.12 GiB, 68.0 MiB, 889.4 KiB, 512 B."""
    if abs(count) >= GIB:
        return f"{count / GIB:.2f} GiB"
    if abs(count) >= MIB:
        return f"{count / MIB:.1f} MiB"
    if abs(count) >= 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{int(count)} B"
