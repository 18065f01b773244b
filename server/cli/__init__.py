"""The `omniloader` command: serve (serve.py), models (models.py, load.py, export_onnx.py) and lab
(lab.py) subcommands, parsed in main.py; server/__main__.py is the entry point."""
