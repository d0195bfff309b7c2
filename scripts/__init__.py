"""Command-line tools of the project, run as modules from the repository root (`python -m scripts.serve`)."""
