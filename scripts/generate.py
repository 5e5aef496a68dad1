"""Generate text with an HF base model (and optionally a LoRA or X-LoRA adapter) at tensor-parallel size N.

    torchrun --nproc_per_node=N scripts/generate.py --base HF_DIR [--adapter DIR] --tp N \\
        (--prompt TEXT | --input-ids 1,2,3) [--max-new-tokens K] [--temperature T] [--top-p P]
        [--seed S] [--dtype fp32] [--logits-out F.safetensors] [--tokens-out F.json]
        [--scalings-out F.safetensors] [--xlora-scalings-once]

An X-LoRA --adapter (PEFT X-LoRA, original xlora package, or megatron-lora X-LoRA
checkpoint) is detected; its scaling pass and scaled pass each keep a KV cache.

Also runs as a plain ``python scripts/generate.py ... --tp 1``.
"""

import sys
from typing import Optional

from megatron_lora.cli import main as cli_main


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)], prog="generate.py")


if __name__ == "__main__":
    sys.exit(main())
