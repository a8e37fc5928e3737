"""``python -m stream.cli``: the ``stemstream`` command."""

import sys

from stream.cli.commands import main

sys.exit(main())
