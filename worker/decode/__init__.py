"""The decode step on a GPU: the kvcache attention kernel and the CUDA-graph replay."""
