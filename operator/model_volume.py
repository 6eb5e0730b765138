"""Where a pod finds the serving's model folder (pure: manifests only).

* ``model.pvc``: the claim, mounted read-only at ``/models``; the folder is
  ``model.path`` (absolute, or relative to the mount);
* ``model.preset`` for a pod that needs a folder (a vLLM engine, and a router reading
  the tokenizer and ``config.json``): an ``emptyDir`` at ``/models`` that an init
  container fills with ``kvmarina model export`` — with the seeded weights from the
  engine image, or only the tokenizer and config from the (torch-free) router image;
* a reference engine's preset needs no folder (it builds the model from the preset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmarina.specs import ModelSpec

MODEL_MOUNT = "/models"
VOLUME = "model"


@dataclass
class ModelVolume:
    """What a pod adds to see the model: ``model_dir`` is the folder inside the pod
    (``None``: the pod needs none)."""

    model_dir: str | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    init_containers: list[dict[str, Any]] = field(default_factory=list)


def model_dir_in_pod(model: ModelSpec) -> str:
    path = model.path
    return path if path.startswith("/") else f"{MODEL_MOUNT}/{path}"


def model_volume(
    model: ModelSpec, *, folder_needed: bool, export_image: str, weights: bool, pull_policy: str
) -> ModelVolume:
    """The model folder for one pod: from the claim, or exported from the preset by an
    init container of ``export_image`` (``weights``: with the seeded weights)."""
    if model.pvc:
        return ModelVolume(
            model_dir_in_pod(model),
            [{"name": VOLUME, "persistentVolumeClaim": {"claimName": model.pvc, "readOnly": True}}],
            [{"name": VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}],
        )
    if not folder_needed or model.preset is None:
        return ModelVolume()
    args = ["model", "export", "--preset", model.preset, "--dtype", model.dtype]
    args += ["--out", MODEL_MOUNT] + ([] if weights else ["--no-weights"])
    export = {
        "name": "export-model",
        "image": export_image,
        "imagePullPolicy": pull_policy,
        "args": args,
        "volumeMounts": [{"name": VOLUME, "mountPath": MODEL_MOUNT}],
    }
    return ModelVolume(
        MODEL_MOUNT,
        [{"name": VOLUME, "emptyDir": {}}],
        [{"name": VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}],
        [export],
    )
