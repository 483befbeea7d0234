"""The quailora-convert command line (Typer), installed as the `quailora_cli` package.

One module per command group, registered on the app in app.py; main.py is the console script
(routing `quailora-convert MODEL ...` to `convert` and mapping errors to one line); progress.py
listens to the library's typed events. The library never imports this package.
"""
