"""Hugging Face models: config and weight import, the Llama-family name and layout rules."""
