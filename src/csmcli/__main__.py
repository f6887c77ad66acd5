"""``python -m csmcli`` runs the ``csm`` command."""

from .cli import main

main()
