"""Checks of the repository's own files that the pre-commit hooks run (`make lint`), each a module
with a command line: `python -m checks.manifests`, `python -m checks.workflow_scripts`."""
