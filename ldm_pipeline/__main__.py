"""`python -m ldm_pipeline ...` runs the `ldm` command (also under `accelerate launch -m ldm_pipeline`)."""

import sys

from .apps.cli import main

sys.exit(main())
