"""Run Prometheus and Alertmanager (the Debian packages' binaries) against a running TorchServe.

    make monitor                                       # = python -m monitoring.stack
    python -m monitoring.stack --instance default --prometheus-port 9090 --alertmanager-port 9093

Prometheus scrapes the local server's metrics port (read from `python -m scripts.serve`'s instance
record), evaluates monitoring/prometheus/rules.yml and sends alerts to Alertmanager, which runs
monitoring/alertmanager/alertmanager.yml. Both keep their data under .monitor/ and run in the
foreground until Ctrl-C. Import monitoring/grafana/fashion-mnist.json into a Grafana that uses
this Prometheus as its data source for the dashboard. The tests start the same stack on free ports
with short intervals through `Stack`. Exit status: 0 after Ctrl-C, 1 when something cannot start.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from serving.server import START_HINT, Instance, read_record

REPO = Path(__file__).resolve().parent.parent
RULES_FILE = REPO / "monitoring" / "prometheus" / "rules.yml"
ALERTMANAGER_FILE = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"
JOB = "torchserve"  # the scrape job the rules' TargetDown watches (monitoring.rules --job)
SETUP_HINT = "run `scripts/setup.sh --dev` (Debian packages prometheus and prometheus-alertmanager)"


class StackError(RuntimeError):
    """Prometheus or Alertmanager could not start; the message says why and what to do."""


def binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise StackError(f"{names[0]} is not installed: {SETUP_HINT}")


def prometheus_config(
    targets: Sequence[str], rules_file: Path, alertmanager: str | None, scrape_interval: str = "15s"
) -> dict[str, Any]:
    """A prometheus.yml scraping TorchServe's metrics `targets` (host:port) as job `torchserve`."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}],
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def alertmanager_config(webhook: str | None = None, group_wait: str | None = None) -> dict[str, Any]:
    """The committed alertmanager.yml, optionally with another webhook URL and faster grouping."""
    config = yaml.safe_load(ALERTMANAGER_FILE.read_text(encoding="utf-8"))
    if webhook:
        for receiver in config["receivers"]:
            for hook in receiver.get("webhook_configs", []):
                hook["url"] = webhook
    if group_wait:
        config["route"].update(group_wait=group_wait, group_interval=group_wait)
    return config


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@dataclass
class Stack:
    """Prometheus (+ Alertmanager when `alertmanager_port`) with their files under `work`."""

    work: Path
    prometheus_port: int
    alertmanager_port: int | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def start(
        self,
        targets: Sequence[str],
        rules_file: Path,
        scrape_interval: str = "15s",
        webhook: str | None = None,
        group_wait: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Start both and return once each answers /-/ready; on failure nothing is left running."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            alertmanager = None
            if self.alertmanager_port is not None:
                alertmanager = f"127.0.0.1:{self.alertmanager_port}"
                config = self.work / "alertmanager.yml"
                config.write_text(yaml.safe_dump(alertmanager_config(webhook, group_wait)), encoding="utf-8")
                self._launch(
                    "alertmanager",
                    [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={config}",
                     f"--storage.path={self.work / 'alertmanager-data'}",
                     f"--web.listen-address={alertmanager}", "--cluster.listen-address="],
                    self.alertmanager_url, timeout,
                )  # fmt: skip
            config = self.work / "prometheus.yml"
            settings = prometheus_config(targets, rules_file, alertmanager, scrape_interval)
            config.write_text(yaml.safe_dump(settings), encoding="utf-8")
            self._launch(
                "prometheus",
                [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.prometheus_port}"],
                self.prometheus_url, timeout,
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def _launch(self, name: str, command: list[str], url: str, timeout: float) -> None:
        log = self.work / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise StackError(f"{name} did not become ready at {url}; end of {log}:\n{tail}")
            time.sleep(0.25)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instance", default="default", help="the scripts.serve instance to scrape")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".serve")
    parser.add_argument("--work", type=Path, default=REPO / ".monitor", help="Prometheus/Alertmanager data")
    parser.add_argument("--rules", type=Path, default=RULES_FILE)
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--alertmanager-port", type=int, default=9093)
    args = parser.parse_args(None if argv is None else list(argv))
    server = read_record(Instance(args.instance, args.state_dir))
    if server is None:
        print(f"error: no TorchServe instance {args.instance!r} is running; {START_HINT}", file=sys.stderr)
        return 1
    target = server.url("metrics").removeprefix("http://")
    stack = Stack(args.work, args.prometheus_port, args.alertmanager_port)
    try:
        stack.start([target], args.rules.resolve())
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"scraping     http://{target}/metrics every 15s\n"
        f"Prometheus   {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)\n"
        f"Alertmanager {stack.alertmanager_url}  (webhook: {ALERTMANAGER_FILE.relative_to(REPO)})\n"
        "Grafana      import monitoring/grafana/fashion-mnist.json with this Prometheus as data source\n"
        "Ctrl-C stops both."
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(proc.poll() is None for proc in stack.procs):
            time.sleep(1)
        print("error: Prometheus or Alertmanager exited; see the logs in " + str(args.work), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
