"""Reading and writing checkpoints: safetensors headers, sources (folder, GGUF, Hub, pickle), the
streaming sharded writer, atomic output folders, provenance and model card."""
