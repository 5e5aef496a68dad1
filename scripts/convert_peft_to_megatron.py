"""Convert a PEFT LoRA directory into a megatron-lora checkpoint at TP=N.

    python scripts/convert_peft_to_megatron.py --peft DIR --base HF_DIR --tp N --out DIR
"""

import argparse
import sys
from pathlib import Path

from megatron_lora.cli import main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--peft", required=True, metavar="DIR", help="PEFT LoRA directory")
    p.add_argument("--base", required=True, metavar="HF_DIR", help="HF base model directory")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--verify", action="store_true", help="compare HF + PEFT and Megatron logits")
    a = p.parse_args()
    flags = ["--overwrite"] * a.overwrite + ["--verify"] * a.verify
    sys.exit(main(["convert", a.peft, a.out, "--to", "megatron", "--base", a.base, "--tp", str(a.tp), *flags], prog=Path(__file__).name))
