"""Fine-tune LoRA / X-LoRA adapters of an HF model at any TP x PP x DP (``--help``); the same as
``megatron-lora finetune``.

    torchrun --nproc_per_node=2 scripts/finetune.py --tiny      # synthetic smoke run
    torchrun --nproc_per_node=N scripts/finetune.py --base HF_DIR --data FILE.jsonl --save DIR
"""

import sys
from typing import Optional

from megatron_lora.cli import main as cli_main


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)], prog="finetune.py")


if __name__ == "__main__":
    sys.exit(main())
