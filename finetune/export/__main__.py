"""python -m finetune.export: see finetune/export/cli.py (python -m finetune.export --help)."""

import sys

from finetune.export.cli import main

sys.exit(main())
