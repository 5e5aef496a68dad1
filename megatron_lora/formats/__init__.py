"""Adapter files: megatron-lora checkpoints, PEFT LoRA and X-LoRA directories, conversion."""
