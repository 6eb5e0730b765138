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
import subprocess
from pathlib import Path

from kvmarina.local.supervisor import ProcessSpec
from kvmarina.operator.components import PlanError
from kvmarina.specs import ModelSpec

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
    """Give each vLLM engine its own cores: ``cores // engines`` each (one at least;
    engines beyond the cores share them round-robin). A binding the user set wins."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not engines:
        return
    if cores is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cores = sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // len(engines))
    for i, spec in enumerate(engines):
        start = (i * per) % len(cores)
        mine = cores[start : start + per]
        spec.env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
        spec.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
