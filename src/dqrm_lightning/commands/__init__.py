"""The ``dqrm`` subcommands beside LightningCLI's: ``data`` and ``export`` (``reproduce`` and ``dashboard`` live in
their own modules)."""
