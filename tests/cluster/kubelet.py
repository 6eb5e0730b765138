"""A kubelet (and the workload controllers) for the API emulator: runs what the operator plans.

``Kubelet`` reads the DaemonSets and Deployments the operator wrote to the emulator and
runs their pods as local processes, the way a node would:

* each pod gets a network namespace and an address (``netns.PodNetwork``), and a mount
  namespace in which its volumes are mounted at the containers' ``mountPath``:
  ConfigMaps and Secrets as files (kept in step with the API, as the kubelet does),
  ``emptyDir`` (``medium: Memory`` as tmpfs), ``hostPath`` on the pod's node (created
  as root, 0755, for ``DirectoryOrCreate``; refused when a ``Directory`` is missing),
  claims from ``claims`` (folders the test fills);
* init containers run to completion first, then the containers, as the container's
  ``securityContext.runAsUser`` (the test runs as root); a container that exits is
  restarted, its restarts counted;
* images are the project's own (``ghcr.io/kvmarina/...``: entrypoint ``kvmarina``, this
  interpreter) or vLLM's (``python3`` is the vLLM environment's interpreter); any other
  image is refused with its name;
* readiness probes (``httpGet``) are polled on the pod's address; the Pod objects (IP,
  node, ports, ``Ready``) and the workloads' status (ready replicas, scheduled agents)
  are written back to the emulator, which is what the operator reads.

Pods of a DaemonSet go to every node; a Deployment's replicas are spread over them. A
changed pod template replaces its pods. Logs are under ``root/logs/<pod>.<container>.log``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .netns import PodNetwork

KVMARINA_IMAGES = "ghcr.io/kvmarina/"
#: the USER kvmarina's images run as (Dockerfile), when no securityContext says otherwise
IMAGE_USER = 65532


class KubeletError(RuntimeError):
    """A pod this harness cannot run (an image it does not know, a missing hostPath)."""


@dataclass
class Workload:
    kind: str  # Deployment | DaemonSet
    namespace: str
    name: str
    template: dict[str, Any]
    replicas: int

    @property
    def template_hash(self) -> str:
        raw = json.dumps(self.template, sort_keys=True).encode()
        return hashlib.blake2b(raw, digest_size=5).hexdigest()


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    uid: int | None
    probe: tuple[str, int] | None  # (path, port) of an httpGet readiness probe
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log: Path | None = None


@dataclass
class Pod:
    workload: Workload
    name: str
    node: str
    netns: str
    ip: str
    dir: Path
    spec: dict[str, Any]
    containers: list[Container] = field(default_factory=list)
    mounts: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict)
    ready: bool = False
    started: bool = False


class Kubelet:
    """Runs the pods of the emulator's workloads. Invariant: ``pods`` holds, for each
    workload of the current API view, its pods for the workload's current template."""

    def __init__(
        self,
        api: str,
        root: Path,
        network: PodNetwork,
        nodes: list[str],
        *,
        vllm_python: str | None = None,
        claims: dict[str, Path] | None = None,
    ) -> None:
        self.api, self.root, self.network, self.nodes = api.rstrip("/"), root, network, nodes
        self.vllm_python, self.claims = vllm_python, claims or {}
        self.pods: dict[str, Pod] = {}
        self.errors: list[str] = []
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        (root / "logs").mkdir(parents=True, exist_ok=True)

    # -- the API ----------------------------------------------------------------------
    async def _get(self, path: str) -> Any:
        assert self._http is not None
        async with self._http.get(self.api + path) as r:
            return await r.json() if r.status == 200 else None

    async def _send(self, method: str, path: str, body: Any) -> None:
        assert self._http is not None
        headers = {"content-type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self._http.request(method, self.api + path, json=body, headers=headers) as r:
            await r.read()

    async def _items(self, group: str, plural: str) -> list[dict[str, Any]]:
        doc = await self._get(f"{group}/{plural}")
        return list((doc or {}).get("items") or [])

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for name in list(self.pods):
            await asyncio.to_thread(self._kill, self.pods.pop(name))
        if self._http is not None:
            await self._http.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the harness says what went wrong, and goes on
                self.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)

    async def _sync(self) -> None:
        workloads = [
            Workload("DaemonSet", d["metadata"]["namespace"], d["metadata"]["name"],
                     d["spec"]["template"], len(self.nodes))
            for d in await self._items("/apis/apps/v1", "daemonsets")
        ] + [
            Workload("Deployment", d["metadata"]["namespace"], d["metadata"]["name"],
                     d["spec"]["template"], int(d["spec"].get("replicas", 1)))
            for d in await self._items("/apis/apps/v1", "deployments")
        ]  # fmt: skip
        wanted: dict[str, tuple[Workload, str]] = {}
        for w in workloads:
            for i in range(w.replicas):
                node = self.nodes[i % len(self.nodes)]
                suffix = node if w.kind == "DaemonSet" else str(i)
                wanted[f"{w.namespace}/{w.name}-{w.template_hash}-{suffix}"] = (w, node)
        for key in [k for k in self.pods if k not in wanted]:
            pod = self.pods.pop(key)
            await asyncio.to_thread(self._kill, pod)
            await self._send(
                "DELETE", f"/api/v1/namespaces/{pod.workload.namespace}/pods/{pod.name}", None
            )
        for key, (w, node) in wanted.items():
            if key not in self.pods:
                self.pods[key] = await self._create(w, key.split("/", 1)[1], node)
        for pod in self.pods.values():
            await self._refresh_volumes(pod)
            await asyncio.to_thread(self._step, pod)
            await self._report(pod)
        for w in workloads:
            await self._workload_status(w)

    # -- pods ---------------------------------------------------------------------------
    async def _create(self, w: Workload, name: str, node: str) -> Pod:
        netns, ip = await asyncio.to_thread(self.network.add, name)
        pod_dir = self.root / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        pod = Pod(w, name, node, netns, ip, pod_dir, w.template["spec"])
        await self._refresh_volumes(pod)
        await self._report(pod)
        return pod

    async def _refresh_volumes(self, pod: Pod) -> None:
        """Write each volume's files (ConfigMaps and Secrets follow the API)."""
        ns = pod.workload.namespace
        for vol in pod.spec.get("volumes") or []:
            src = pod.dir / "volumes" / vol["name"]
            if "configMap" in vol:
                cm = await self._get(
                    f"/api/v1/namespaces/{ns}/configmaps/{vol['configMap']['name']}"
                )
                _write_files(src, (cm or {}).get("data") or {}, decode=False)
            elif "secret" in vol:
                sec = await self._get(
                    f"/api/v1/namespaces/{ns}/secrets/{vol['secret']['secretName']}"
                )
                _write_files(src, (sec or {}).get("data") or {}, decode=True)

    def _source(self, pod: Pod, vol: dict[str, Any]) -> Path:
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = self.root / "nodes" / pod.node / hp["path"].lstrip("/")
            if hp.get("type") == "Directory" and not path.is_dir():
                raise KubeletError(
                    f"pod {pod.name}: hostPath {hp['path']} is not a directory on {pod.node}"
                )
            if not path.exists():  # DirectoryOrCreate: root's, 0755, as the kubelet makes it
                path.mkdir(parents=True, mode=0o755)
            return path
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            if claim not in self.claims:
                raise KubeletError(f"pod {pod.name}: no volume for claim {claim!r}")
            return self.claims[claim]
        src = pod.dir / "volumes" / vol["name"]
        src.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            os.chmod(src, 0o777)  # an emptyDir is writable by any user of the pod
        return src

    def _container(self, pod: Pod, c: dict[str, Any], init: bool) -> Container:
        argv = self._argv(c)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp",
               "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        fields = {"spec.nodeName": pod.node, "status.podIP": pod.ip, "metadata.name": pod.name,
                  "metadata.namespace": pod.workload.namespace}  # fmt: skip
        for e in c.get("env") or []:
            ref = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif ref in fields:
                env[e["name"]] = fields[ref]
            else:
                raise KubeletError(f"pod {pod.name}: env {e['name']}: the harness cannot fill it")
        ctx = {**(pod.spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
        if "runAsUser" not in ctx and c["image"].startswith(KVMARINA_IMAGES):
            ctx["runAsUser"] = IMAGE_USER  # the image's own USER
        probe = None
        rp = (c.get("readinessProbe") or {}).get("httpGet")
        if rp and not init:
            port = rp["port"]
            if isinstance(port, str):
                port = next(p["containerPort"] for p in c.get("ports") or [] if p["name"] == port)
            probe = (rp["path"], int(port))
        return Container(c["name"], argv, env, ctx.get("runAsUser"), probe)

    def _argv(self, c: dict[str, Any]) -> list[str]:
        image, command, args = c["image"], list(c.get("command") or []), list(c.get("args") or [])
        if image.startswith(KVMARINA_IMAGES):
            entry = command or ["kvmarina"]
            if entry[0] == "kvmarina":
                return [sys.executable, "-m", "kvmarina.cli", *entry[1:], *args]
            return [*entry, *args]  # a tool of the image (chown, ...): this machine's
        elif "vllm" in image and command[:1] == ["python3"] and self.vllm_python:
            return [self.vllm_python, *command[1:], *args]
        raise KubeletError(
            f"the harness cannot run image {image!r} with {command or 'its entrypoint'}"
        )

    def _step(self, pod: Pod) -> None:
        """Start a new pod (init containers first), restart what exited, probe."""
        if not pod.started:
            pod.started = True
            try:
                self._start(pod)
            except BaseException:
                # as a kubelet does with a pod that failed to start: stop what runs and
                # start it whole again next sync (else it stays half started forever)
                self._stop(pod.containers)
                pod.containers.clear()
                pod.started = False
                raise
        for cont, c in zip(pod.containers, pod.spec["containers"], strict=True):
            assert cont.proc is not None
            if cont.proc.poll() is not None:
                cont.restarts += 1
                self.errors.append(f"pod {pod.name}/{cont.name} exited: {_tail(cont.log)}")
                self._launch(pod, cont, c, cont.name)
        pod.ready = all(self._probe(pod, c) for c in pod.containers)

    def _start(self, pod: Pod) -> None:
        """Init containers one by one to completion, then the pod's containers."""
        self._prepare_mounts(pod)
        for i, c in enumerate(pod.spec.get("initContainers") or []):
            ic = self._container(pod, c, init=True)
            self._launch(pod, ic, c, f"init-{i}")
            assert ic.proc is not None
            try:
                code = ic.proc.wait(300)
            except subprocess.TimeoutExpired:
                self._stop([ic])
                raise KubeletError(
                    f"pod {pod.name}: init container {ic.name} ran over 300 s"
                ) from None
            if code != 0:
                raise KubeletError(
                    f"pod {pod.name}: init container {ic.name} failed: {_tail(ic.log)}"
                )
        for c in pod.spec["containers"]:
            cont = self._container(pod, c, init=False)
            self._launch(pod, cont, c, cont.name)
            pod.containers.append(cont)

    def _prepare_mounts(self, pod: Pod) -> None:
        vols = {v["name"]: v for v in pod.spec.get("volumes") or []}
        for c in [*(pod.spec.get("initContainers") or []), *pod.spec["containers"]]:
            mounts = []
            for m in c.get("volumeMounts") or []:
                vol = vols[m["name"]]
                src = self._source(pod, vol)
                tmpfs = (vol.get("emptyDir") or {}).get("medium") == "Memory"
                mounts.append(
                    (str(src) if not tmpfs else "tmpfs", m["mountPath"], bool(m.get("readOnly")))
                )
            pod.mounts[c["name"]] = mounts

    def _launch(self, pod: Pod, cont: Container, c: dict[str, Any], tag: str) -> None:
        """Run the container in the pod's network namespace and a mount namespace of
        its own where its volumes sit at their mountPath."""
        lines = ["set -e"]
        for src, dst, ro in pod.mounts.get(c["name"], []):
            lines.append(f"mkdir -p {shlex.quote(dst)}")
            if src == "tmpfs":
                lines.append(f"mount -t tmpfs tmpfs {shlex.quote(dst)}")
            else:
                lines.append(f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}")
                if ro:
                    lines.append(f"mount -o remount,bind,ro {shlex.quote(dst)}")
        user = (
            []
            if cont.uid is None
            else ["setpriv", f"--reuid={cont.uid}", f"--regid={cont.uid}", "--clear-groups"]
        )
        lines.append("cd /tmp")
        lines.append("exec " + " ".join(shlex.quote(a) for a in [*user, *cont.argv]))
        script = pod.dir / f"{tag}.sh"
        script.write_text("\n".join(lines) + "\n")
        cont.log = self.root / "logs" / f"{pod.name}.{tag}.log"
        with cont.log.open("ab") as out:
            cont.proc = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, "unshare", "--mount", "--propagation", "private",
                 "sh", str(script)],
                stdout=out, stderr=subprocess.STDOUT, env=cont.env, start_new_session=True,
            )  # fmt: skip

    def _probe(self, pod: Pod, cont: Container) -> bool:
        if cont.proc is None or cont.proc.poll() is not None:
            return False
        if cont.probe is None:
            return True
        path, port = cont.probe
        try:
            with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}", timeout=2) as r:
                return 200 <= r.status < 400
        except OSError:
            return False

    def _kill(self, pod: Pod) -> None:
        self._stop(pod.containers)
        self.network.remove(pod.name)

    def _stop(self, containers: list[Container]) -> None:
        for cont in containers:
            if cont.proc is not None and cont.proc.poll() is None:
                os.killpg(cont.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3  # a test fixture: no need to wait out a drain
        for cont in containers:
            if cont.proc is not None:
                try:
                    cont.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(cont.proc.pid, signal.SIGKILL)

    # -- status ---------------------------------------------------------------------------
    async def _report(self, pod: Pod) -> None:
        w = pod.workload
        labels = {**((w.template.get("metadata") or {}).get("labels") or {})}
        labels["pod-template-hash"] = w.template_hash
        ports = [{"name": c["name"], "ports": c.get("ports") or []} for c in pod.spec["containers"]]
        doc = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": w.namespace, "labels": labels},
            "spec": {"nodeName": pod.node, "containers": ports},
            "status": {
                "podIP": pod.ip,
                "phase": "Running" if pod.started else "Pending",
                "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
                "containerStatuses": [
                    {"name": c.name, "restartCount": c.restarts} for c in pod.containers
                ],
            },
        }
        path = f"/api/v1/namespaces/{w.namespace}/pods"
        existing = await self._get(f"{path}/{pod.name}")
        if existing is None:
            await self._send("POST", path, doc)
        elif existing.get("status") != doc["status"]:  # the emulator patches, never PUTs
            await self._send("PATCH", f"{path}/{pod.name}", {"status": doc["status"]})

    async def _workload_status(self, w: Workload) -> None:
        mine = [
            p
            for p in self.pods.values()
            if p.workload.name == w.name and p.workload.namespace == w.namespace
        ]
        ready = sum(1 for p in mine if p.ready)
        if w.kind == "Deployment":
            status = {
                "replicas": len(mine),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": len(mine),
            }
            path = f"/apis/apps/v1/namespaces/{w.namespace}/deployments/{w.name}"
        else:
            status = {
                "desiredNumberScheduled": len(self.nodes),
                "currentNumberScheduled": len(mine),
                "numberReady": ready,
            }
            path = f"/apis/apps/v1/namespaces/{w.namespace}/daemonsets/{w.name}"
        await self._send("PATCH", path, {"status": status})  # fmt: skip

    def pod_ips(self, namespace: str, component: str) -> list[str]:
        return [
            p.ip for p in self.pods.values()
            if p.workload.namespace == namespace
            and (p.workload.template.get("metadata") or {}).get("labels", {}).get(
                "app.kubernetes.io/component") == component
        ]  # fmt: skip


def _write_files(folder: Path, data: dict[str, str], decode: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in data.items():
        body = base64.b64decode(value) if decode else value.encode()
        path = folder / name
        if path.exists() and path.read_bytes() == body:
            continue
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(body)
        os.chmod(tmp, 0o644)
        tmp.replace(path)


def _tail(log: Path | None, n: int = 1500) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n:]
