"""``python -m diffusion_fast`` runs the ``diffusion-fast`` command (also under torchrun)."""

import sys

from diffusion_fast.cli import main

sys.exit(main())
