"""``python -m privdebias_jax`` runs the ``privdebias`` command line."""

import sys

from privdebias_jax.cli import main

sys.exit(main())
