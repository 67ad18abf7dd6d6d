"""`python -m shadowctl` is the `shadowctl` command."""

from shadowctl.cli.app import main

main()
