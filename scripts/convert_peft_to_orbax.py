#!/usr/bin/env python
"""Convert PEFT LoRA adapters to Orbax checkpoints: see jaxserve/lora/convert.py.

  python scripts/convert_peft_to_orbax.py SRC DST [--model PATH]
"""
import sys

from jaxserve.lora.convert import main

if __name__ == "__main__":
    sys.exit(main())
