"""Checkpoint I/O: HF safetensors directories, GGUF files (in and out), name resolution."""
