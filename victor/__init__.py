"""Victor: the example custom backend (runner.py + config.yaml), the contract users copy."""
