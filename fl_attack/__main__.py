"""``python -m fl_attack`` runs the command line."""

from __future__ import annotations

import sys

from fl_attack.cli import main

sys.exit(main())
