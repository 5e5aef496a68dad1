"""Convert a megatron-lora checkpoint (any TP) into a PEFT LoRA directory.

    python scripts/convert_megatron_to_peft.py --megatron DIR --base HF_DIR --out DIR [--moe-layout per-expert]
"""

import argparse
import sys
from pathlib import Path

from megatron_lora.cli import main
from megatron_lora.hf.layout import MOE_LAYOUTS

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--megatron", required=True, metavar="DIR", help="megatron-lora checkpoint directory")
    p.add_argument("--base", required=True, metavar="HF_DIR", help="HF base model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true", help="compare HF + PEFT and Megatron logits")
    p.add_argument("--moe-layout", choices=MOE_LAYOUTS, default="fused",
                   help="experts of a mixture of experts: transformers 5's fused target_parameters (default) "
                   "or transformers 4's per-expert modules")
    a = p.parse_args()
    flags = ["--overwrite"] * a.overwrite + ["--verify"] * a.verify + ["--moe-layout", a.moe_layout]
    sys.exit(main(["convert", a.megatron, a.out, "--to", "peft", "--base", a.base, *flags], prog=Path(__file__).name))
