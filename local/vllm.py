"""vLLM engines as local processes: where vLLM is installed, the model folder, the cores.

* vLLM lives in a virtual environment of its own (its pins do not fit the project's):
  ``$KVMARINA_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the working directory
  or one above it (``make vllm`` creates it there);
* a preset is exported as a Hugging Face folder into the run directory (seeded weights,
  byte-level tokenizer, chat template: ``kvmarina model export``); a model of a claim
  is the folder ``--model-dir`` names, else ``model.path`` when it exists here;
* engines on one machine behave like engines on separate accelerators: each vLLM is
  bound to its own share of the cores (``VLLM_CPU_OMP_THREADS_BIND``), as
  ``fleet.share_cores`` gives the reference engines theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvmarina.local.ports import free_ports
from kvmarina.local.supervisor import ProcessSpec, usable_cpus
from kvmarina.operator.components import VLLM_MODULE, PlanError, vllm_args, vllm_env
from kvmarina.specs import KVCachePoolSpec, ModelServingSpec, ModelSpec

VENV = ".venv-vllm"


def vllm_python(cwd: Path | None = None) -> str:
    """The interpreter that runs vLLM; ``PlanError`` saying how to get one."""
    override = os.environ.get("KVMARINA_VLLM_PYTHON")
    candidates = [Path(override)] if override else []
    here = (cwd or Path.cwd()).resolve()
    candidates += [d / VENV / "bin" / "python" for d in (here, *here.parents)]
    for python in candidates:
        if python.is_file() and _has_vllm(python):
            return str(python)
    where = f"$KVMARINA_VLLM_PYTHON ({override})" if override else f"{VENV}/ here or above"
    raise PlanError(
        f"vLLM engines need a Python with vLLM; none found at {where}. "
        "Run `make vllm` in the kvmarina checkout (about 2 minutes, 3.5 GB), or point "
        "KVMARINA_VLLM_PYTHON at an interpreter that can `import vllm`"
    )


def _has_vllm(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([str(python), "-c", probe], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def model_folder(model: ModelSpec, run_dir: Path, model_dir: str | None) -> str:
    """The folder vLLM (and the router) read the model from."""
    if model.preset is not None:
        from kvmarina.engine.weights import export_preset

        out = run_dir / "models" / f"{model.preset}-{model.dtype}"
        if not (out / "model.safetensors").is_file():
            export_preset(model.preset, model.dtype, out)
        return str(out)
    folder = model_dir or model.path
    if not (Path(folder) / "config.json").is_file():
        raise PlanError(
            f"model {model.name!r}: no Hugging Face folder at {folder} (no config.json); "
            "give the weights' folder with --model-dir"
        )
    return str(Path(folder).resolve())


def bind_cores(engines: list[ProcessSpec], cores: list[int] | None = None) -> None:
    """Give each vLLM engine its own cores, ``cores // engines`` each (one at least;
    engines beyond the cores share them round-robin): its compute threads
    (``VLLM_CPU_OMP_THREADS_BIND``) and the whole process tree (``ProcessSpec.cpus``),
    its API server included, as a kubelet's CPU manager gives a pod its cores. With
    only the compute threads bound, the API servers of the 2-core demo fleet floated
    between the cores, and one engine often took twice as long per prefill as its
    sibling (vLLM's own figures), which one changing from round to round (the demo's
    workload, per-round TTFT p50: cache-aware 64.5-105.7 ms and the SGLang router
    65.6-87.7 with the compute threads alone bound; 42.8-46.5 and 46.6-48.4 with each
    tree bound, ``benchmarks/fleet.py --engine vllm --rounds 5``). A binding the user
    set wins."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not engines:
        return
    if cores is None:
        cores = usable_cpus()
    per = max(1, len(cores) // len(engines))
    for i, spec in enumerate(engines):
        start = (i * per) % len(cores)
        mine = cores[start : start + per]
        env = {
            **spec.env,
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine)),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
        engines[i] = replace(spec, env=env, cpus=tuple(mine))


class VLLMProcess:
    """One vLLM OpenAI server on loopback, started with the flags kvmarina derives for
    ``serving`` on ``pool`` (tests and benchmarks; ``kvmarina up`` plans its own through
    ``fleet.py``). ``start`` returns at once; ``wait`` until ``/health`` answers."""

    def __init__(
        self,
        python: str,
        serving: ModelServingSpec,
        pool: KVCachePoolSpec,
        model_dir: str,
        log: Path,
        cores: str = "0",
        connector: dict[str, Any] | None = None,
    ) -> None:
        self.python, self.serving, self.pool = python, serving, pool
        self.model_dir, self.log, self.cores = model_dir, log, cores
        self.connector = connector
        self.port, self.events, self.replay = free_ports(3)
        self.url = f"http://127.0.0.1:{self.port}"
        self.events_url = f"tcp://127.0.0.1:{self.events}"
        self.replay_url = f"tcp://127.0.0.1:{self.replay}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = vllm_args(
            self.serving, self.pool, model_dir=self.model_dir, port=self.port,
            host="127.0.0.1", events_port=self.events, replay_port=self.replay,
            log_level="warning", connector=self.connector,
        )  # fmt: skip
        env = {
            **os.environ, **vllm_env("warning"), "PYTHONSAFEPATH": "1",
            "VLLM_CPU_OMP_THREADS_BIND": self.cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache, as in a local fleet
        }  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", VLLM_MODULE, *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM not ready in {timeout:g} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
