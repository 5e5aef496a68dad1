"""Tensor-parallel building blocks: LoRA layers, folded collectives, CPU execution."""
