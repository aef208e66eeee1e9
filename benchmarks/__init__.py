"""Measurements, not pass/fail: speed, memory estimate against NVML, Ray, datasets."""
