"""Docker helpers for the container tests: build the serving image once, run containers
hardened, and run the pod of the rendered Kubernetes manifests with a real engine.

Kubernetes cannot run on the build machines, but Docker can run a pod's containers the way the
kubelet would: a holder container owns the network namespace and publishes the pod's ports
(Kubernetes' pause container), and every container of the rendered Deployment joins it with the
args, env, volumes, user, memory limit and securityContext the manifest gives it. `Pod` does that
and runs the manifest's probes and preStop hooks against the result, so a manifest that drifts
from the image fails here. Used by tests/test_container.py, test_proxy.py and test_deploy_pod.py;
`hardened_flags` (GKE's hardening as `docker run` flags) comes from serving/container.py, which the
container benchmark uses too.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import REPO
from serving.container import hardened_flags
from serving.waiting import wait_for


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"docker {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc


@functools.cache
def ensure_engine() -> None:
    """Start Docker the way CI does (scripts/ensure_dockerd.sh); idempotent."""
    subprocess.run([str(REPO / "scripts" / "ensure_dockerd.sh")], check=True, timeout=180)


@functools.cache
def build_image(tag: str, target: str = "serve", mar: Path | None = None, train: bool = False) -> str:
    """Build with the project's own command, once per session; returns the tag.

    `train` builds Dockerfile.train instead of the serving image's `target`. FASHION_TEST_TAG
    replaces the "test" of a ":test..." tag, so checkouts sharing one engine don't share images."""
    tag = tag.replace(":test", ":" + os.environ.get("FASHION_TEST_TAG", "test"), 1)
    ensure_engine()
    cmd = [str(REPO / "scripts" / "build_image.sh"), "--tag", tag]
    cmd += ["--train"] if train else ["--target", target]
    if mar is not None:
        cmd += ["--mar", str(mar)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return tag


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are answers, not exceptions.

    The default timeout catches a hung server, not a slow one: while the parallel phase builds
    images and runs other JVMs on two cores, one answer from a ready pod has taken over 10 s
    (CI, test_proxy). Latency is measured by the benchmarks, not here.
    """
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@dataclass
class Container:
    """One `docker run -d`; remove() when done."""

    id: str

    @classmethod
    def run(cls, image: str, *args: str, flags: list[str] | tuple[str, ...] = ()) -> Container:
        ensure_engine()
        return cls(docker("run", "--detach", *flags, image, *args).stdout.strip())

    def inspect(self) -> dict[str, Any]:
        return json.loads(docker("inspect", self.id).stdout)[0]

    def host_port(self, port: int) -> int:
        """The 127.0.0.1 port Docker published for container port `port`."""
        bindings = self.inspect()["NetworkSettings"]["Ports"][f"{port}/tcp"]
        return int(bindings[0]["HostPort"])

    def health(self) -> str:
        return self.inspect()["State"]["Health"]["Status"]

    def running(self) -> bool:
        return self.inspect()["State"]["Running"]

    def exec(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.id, *cmd, timeout=timeout, check=False)

    def logs(self) -> str:
        proc = docker("logs", self.id, check=False)
        return proc.stdout + proc.stderr

    def wait_healthy(self, timeout: float = 120) -> None:
        def healthy() -> bool:
            state = self.inspect()["State"]
            assert state["Running"], f"container exited ({state['ExitCode']}):\n{self.logs()[-3000:]}"
            return state["Health"]["Status"] == "healthy"

        wait_for(healthy, timeout, "the container's HEALTHCHECK to pass", interval=0.5)

    def stop(self, grace: float) -> tuple[int, float]:
        """`docker stop -t grace` (SIGTERM, SIGKILL after `grace` s); returns (exit code, seconds)."""
        start = time.monotonic()
        docker("stop", "--time", str(int(grace)), self.id, timeout=grace + 60)
        return self.inspect()["State"]["ExitCode"], time.monotonic() - start

    def start(self) -> None:
        docker("start", self.id)

    def wait_exit(self, timeout: float = 60) -> int:
        return int(docker("wait", self.id, timeout=timeout).stdout.strip())

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.id, check=False)


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def deployment_containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The containers of the one Deployment in `docs`, by name."""
    return {c["name"]: c for c in find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]}


def docker_size(quantity: str) -> str:
    """Kubernetes binary quantity (Mi, Gi) -> a size Docker accepts."""
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, docker_suffix in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + docker_suffix
    raise ValueError(f"{quantity!r}: only Ki/Mi/Gi quantities are emulated; add the unit here")


# securityContext fields the emulation knows how to apply; anything else fails loudly, so a new
# manifest setting cannot pass these tests unexamined.
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
CONTAINER_SECURITY = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}


@dataclass
class Pod:
    """The Deployment's pod template, run with Docker; see the module docstring."""

    spec: dict[str, Any]
    holder: Container
    containers: dict[str, Container] = field(default_factory=dict)

    @classmethod
    def run(
        cls, docs: list[dict[str, Any]], image: str, workdir: Path, secrets: dict[str, dict[str, str]]
    ) -> Pod:
        """Start every container of the rendered Deployment from `image`.

        `secrets` gives the files of each Secret the pod mounts (they are not in the manifests).
        """
        spec = find(docs, "Deployment")["spec"]["template"]["spec"]
        pod_security = spec["securityContext"]
        unknown = set(pod_security) - POD_SECURITY
        assert not unknown, f"pod securityContext {unknown} is not emulated in tests/containers.py"
        assert pod_security["runAsNonRoot"] and pod_security["runAsUser"] != 0
        ports = [p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])]
        publish = [f"--publish=127.0.0.1::{port}" for port in ports]
        holder = Container.run(image, "sleep", "infinity", flags=[*hardened_flags("32m", ()), *publish])
        pod = cls(spec, holder)
        try:
            for container in spec["containers"]:
                flags = pod._flags(container, docs, workdir, secrets)
                args = container.get("args", [])
                pod.containers[container["name"]] = Container.run(image, *args, flags=flags)
        except BaseException:
            pod.remove()
            raise
        return pod

    def _flags(
        self,
        container: dict[str, Any],
        docs: list[dict[str, Any]],
        workdir: Path,
        secrets: dict[str, dict[str, str]],
    ) -> list[str]:
        pod_security, security = self.spec["securityContext"], container["securityContext"]
        unknown = set(security) - CONTAINER_SECURITY
        assert not unknown, f"container securityContext {unknown} is not emulated in tests/containers.py"
        uid, gid = pod_security["runAsUser"], pod_security.get("fsGroup", pod_security["runAsGroup"])
        flags = ["--network", f"container:{self.holder.id}", "--user", f"{uid}:{pod_security['runAsGroup']}"]
        if security.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        if security.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        flags += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
        flags += ["--memory", docker_size(container["resources"]["limits"]["memory"])]
        flags += [f"--env={env['name']}={env['value']}" for env in container.get("env", [])]
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        for mount in container.get("volumeMounts", []):
            volume, target = volumes[mount["name"]], mount["mountPath"]
            if "emptyDir" in volume:
                size = docker_size(volume["emptyDir"]["sizeLimit"])
                flags += ["--tmpfs", f"{target}:uid={uid},gid={gid},size={size}"]
                continue
            if "configMap" in volume:
                files = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
            else:
                files = secrets[volume["secret"]["secretName"]]
            source = workdir / container["name"] / mount["name"]
            source.mkdir(parents=True)
            for name, text in files.items():
                (source / name).write_text(text, encoding="utf-8")
                # A bind mount keeps host ownership; fsGroup's group read is emulated by world read.
                (source / name).chmod(0o444)
            flags += ["--volume", f"{source}:{target}:ro"]
        return flags

    def port(self, name_or_number: str | int) -> int:
        """Host port of a pod port, given as the manifest does (a port name or a number)."""
        if isinstance(name_or_number, int):
            return self.holder.host_port(name_or_number)
        for container in self.spec["containers"]:
            for port in container.get("ports", []):
                if port.get("name") == name_or_number:
                    return self.holder.host_port(port["containerPort"])
        raise KeyError(f"no container port named {name_or_number!r}")

    def ip(self) -> str:
        return self.holder.inspect()["NetworkSettings"]["IPAddress"]

    def container_spec(self, name: str) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def probe(self, container: str, kind: str) -> bool:
        """Run `kind` (startupProbe, readinessProbe, livenessProbe) of `container` once, like the kubelet."""
        probe = self.container_spec(container)[kind]
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            action = probe["httpGet"]
            url = f"http://127.0.0.1:{self.port(action['port'])}{action.get('path', '/')}"
            try:
                status, _ = http("GET", url, timeout=timeout)
            except OSError:
                return False
            return 200 <= status < 400
        if "exec" in probe:
            try:
                proc = self.containers[container].exec(*probe["exec"]["command"], timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return proc.returncode == 0
        raise AssertionError(f"{container}.{kind}: only httpGet and exec probes are emulated")

    def wait_ready(self, timeout: float = 180) -> None:
        """Until every startup probe and then every readiness probe passes."""
        for kind in ("startupProbe", "readinessProbe"):
            for name, container in self.containers.items():

                def passes(name: str = name, container: Container = container, kind: str = kind) -> bool:
                    assert container.running(), f"{name} exited:\n{container.logs()[-3000:]}"
                    return self.probe(name, kind)

                wait_for(passes, timeout, f"{name}'s {kind}", interval=0.5)

    def terminate(self) -> dict[str, tuple[int, float]]:
        """Delete the pod as the kubelet would: in every container at once, the preStop sleep, then
        SIGTERM, then SIGKILL when terminationGracePeriodSeconds (counted from the start) runs out.

        Returns {container: (exit code, seconds from the start of the deletion to its exit)}.
        """
        grace = self.spec["terminationGracePeriodSeconds"]
        start = time.monotonic()
        results: dict[str, tuple[int, float]] = {}

        def stop(name: str, container: Container) -> None:
            pre_stop = self.container_spec(name).get("lifecycle", {}).get("preStop", {})
            assert set(pre_stop) <= {"sleep"}, f"{name}: only preStop sleep is emulated"
            time.sleep(pre_stop.get("sleep", {}).get("seconds", 0))
            code, _ = container.stop(max(grace - (time.monotonic() - start), 0))
            results[name] = (code, time.monotonic() - start)

        threads = [threading.Thread(target=stop, args=item) for item in self.containers.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def remove(self) -> None:
        for container in self.containers.values():
            container.remove()
        self.holder.remove()
