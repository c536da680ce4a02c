"""``python -m tq_cli``: the ``tq`` command without its console script."""

from .main import cli

cli()
