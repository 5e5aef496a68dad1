"""Fine-tune LoRA / X-LoRA adapters of an HF model at any TP x PP x DP (``--help``).

    torchrun --nproc_per_node=2 scripts/finetune.py --tiny      # synthetic smoke run
    torchrun --nproc_per_node=N scripts/finetune.py --base HF_DIR --data FILE.jsonl --save DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from megatron_lora.finetune_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
