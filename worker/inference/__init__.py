"""Batches through the model: prompts, images, generation, parity."""
