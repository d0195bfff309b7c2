"""Java properties text (TorchServe's config.properties) as a dict: the one reader of that format.

    from serving.properties import parse_properties
    settings = parse_properties(Path("docker/config.properties").read_text(encoding="utf-8"))

Standard library only, and importing nothing else from the project: the serving image ships this
one file as /opt/fashion-serve/serving/properties.py (Dockerfile), where docker/healthcheck.py and
docker/drain.py import it without the rest of `serving/`, and the health check must start in tens of
milliseconds. serving.tsconfig renders the files; this reads them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config.properties text or source file that breaks the rules; the message names the fix."""


def parse_properties(text: str) -> dict[str, str]:
    """The `key=value` (or `key: value`) entries of a Java properties text, comments skipped;
    a later entry wins, as in java.util.Properties. Line continuations are not used by TorchServe's
    settings and not supported. Raises ConfigError for a line that is none of these."""
    props = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            raise ConfigError(f"not a key=value line: {raw!r}")
        props[line[:cut].strip()] = line[cut + 1 :].strip()
    return props
