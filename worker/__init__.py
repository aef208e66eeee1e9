"""The evaluation worker: one fresh interpreter per recipe, owning the GPU and dying with its CUDA context."""
