"""``python -m megatron_lora.cli`` (also under ``torchrun -m``)."""

import sys

from megatron_lora.cli.main import main

sys.exit(main())
