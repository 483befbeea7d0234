"""The quailora-convert command line (Typer). The library never imports this package."""
