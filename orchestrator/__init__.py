"""evalorch: evaluate fine-tuned vision-language models, each in a fresh worker process.

The orchestrator package is the parent side and never imports torch, transformers or peft.
"""

__version__ = "0.1.0"
