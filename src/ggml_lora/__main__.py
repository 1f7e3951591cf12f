"""python -m ggml_lora ... is the ggml-lora command."""

import sys

from .cli import main

sys.exit(main())
