"""memcore: watch a language model memorize text."""

import logging

__version__ = "0.1.0"

# bitsandbytes, imported by peft, warns on every import on a CPU with AVX-512 bf16 that it could not fetch an
# optional faster 4-bit kernel from the hub (`pip install kernels`); it then uses its own, which is what memcore
# measures with. The warning reads like a failure, so it is kept to bitsandbytes' log at ERROR level only.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
