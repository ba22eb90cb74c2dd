"""The ``trustfleet`` command line: one Typer app; each domain adds its verbs."""
