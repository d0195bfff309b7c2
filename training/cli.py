"""What every stage's command line shares: default paths and the exit-code convention.

The data, training, export, evaluation and archive commands all take their default paths from here,
anchored at the repository root, so `python -m training.export` finds the run that
`python -m training.train` wrote whatever directory either was started from. Relative paths in the
Hydra config (`data.root`, `run_root`, ...) are taken from the repository root too; paths given as
command-line flags are taken from the current directory, as usual.

Exit codes: 0 success, 2 a usage or input problem the user fixes (a missing or damaged file, a bad
flag), 1 a step that failed on good input (a parity check, the archiver). argparse already exits 2
for bad flags; `StageError.exit_code` carries the choice for everything else, and a path that cannot be
read or written (OSError) is an input problem too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
RUN_ROOT = REPO_ROOT / "outputs" / "train"
EXPORT_DIR = REPO_ROOT / "artifacts" / "model"
REPORTS_DIR = REPO_ROOT / "reports"
MODEL_STORE = REPO_ROOT / "model_store"

EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_model_and_data(parser: argparse.ArgumentParser) -> None:
    """--model-dir and --data, for every command that runs an exported model on the processed data."""
    parser.add_argument("--model-dir", type=Path, default=EXPORT_DIR, help="output of training.export")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="root given to training.data")


def repo_path(value: str | Path) -> Path:
    """A config path: relative ones are taken from the repository root, absolute ones as given."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


class StageError(Exception):
    """A stage could not do its job; the message says what to do next. Exit 1 unless told otherwise."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def run_stage(prog: str, action: Callable[[], int | None]) -> int:
    """Run a stage's main action; a StageError or OSError becomes one `prog: error: ...` line, exit 1 or 2."""
    try:
        return action() or 0
    except StageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A path the stage could not read or write (a file where a directory belongs, no permission,
        # a full disk): the place given is what needs fixing, so say which one, in one line.
        where = exc.filename if exc.filename is not None else "a file"
        fix = "check the path (and free space), or give another"
        print(f"{prog}: error: {where}: {exc.strerror or exc}; {fix}", file=sys.stderr)
        return EXIT_USAGE
