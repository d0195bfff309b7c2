"""Render params.yaml, the DVC pipeline's parameters, from the Hydra configs in configs/.

    python -m training.params                          # configs/ defaults -> params.yaml
    python -m training.params experiment=accurate      # any Hydra override, as for training.train
    python -m training.params --check                  # exit 1 if params.yaml differs from configs/

configs/ is the only place a setting is written down. params.yaml is its rendered form: the
fully composed, resolved config that `dvc repro` tracks (a changed value reruns exactly the
stages that list it) and that the train stage loads back through Hydra, still checked by the
typed schema. `dvc exp run -S model.width=48` edits params.yaml for one experiment; the next
`python -m training.params` (scripts/main.sh runs it) renders configs/ again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training.config import CONFIG_DIR, register_configs

PARAMS_FILE = Path("params.yaml")
HEADER = (
    "# Rendered from configs/ by `python -m training.params`: edit configs/, not this file.\n"
    "# The train stage loads it with Hydra (`--config-name params`), so the schema still applies.\n"
)


def render(overrides: Sequence[str] = ()) -> str:
    """params.yaml's text for configs/train.yaml composed with Hydra `overrides`."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    body = OmegaConf.to_container(cfg, resolve=True)
    # Loaded back as a Hydra primary config: the schema first, so a bad `dvc exp run -S` value fails.
    document = {"defaults": ["train_schema", "_self_"], **body}
    return HEADER + yaml.safe_dump(document, sort_keys=False)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.width=48 experiment=smoke")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE, help="where to write (default params.yaml)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if --out is stale")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        text = render(args.overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}\nsee configs/ for the valid groups and keys", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} differs from configs/: run `python -m training.params`", file=sys.stderr)
            return 1
        return 0
    if not args.out.is_file() or args.out.read_text() != text:  # unchanged file: mtime kept
        args.out.write_text(text)
    with_overrides = f" with {' '.join(args.overrides)}" if args.overrides else ""
    print(f"params: {args.out} from configs/{with_overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
