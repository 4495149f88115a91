"""``python -m engine``: the program entry point, where the engine's commands (:mod:`engine.cli`:
``prepare``, ``trace``) meet ``experiment`` (:mod:`concepts.cli`), which resolves steering specs
in the neuron database. This file is only ever run, never imported: the ``engine`` package
itself imports no database code.
"""

import sys

from concepts.cli import register_cli

from .cli import main

sys.exit(main(extra_commands=[register_cli]))
