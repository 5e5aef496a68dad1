"""What acts on a model: the GPT builder, apply_lora and merging, adapter I/O, the X-LoRA model."""
