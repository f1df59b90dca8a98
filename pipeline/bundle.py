"""The model bundle: everything inference needs, in one folder or one MLflow registered model.

Bundle folder layout::

    bundle.json     format version, network name + options, label names, code version,
                    postprocessing, number of folds, CV score, calibration, qc_reference
    plan.json       the training plan (spacing, normalisation, patch size, labels)
    fold_0.pt ...   one state_dict per fold (tensors only; loaded with ``weights_only=True``)
    registry.json   (only in downloaded copies) registered model name and version

In MLflow the bundle is the :data:`BUNDLE_ARTIFACT` artifact of a pyfunc model; registering it
(champion alias) and the pyfunc wrapper live in :mod:`pipeline.tracking_registry`. This module
reads bundles back from a folder or any MLflow model URI (:func:`load_bundle`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.inference.postprocessing import normalize_postprocessing, warn_legacy_postprocessing
from pipeline.tracking import check_tracking_reachable, code_version, set_global_uri, tracking_uri
from preprocessing.atomic import atomic_path, write_text_atomic
from preprocessing.plan import Plan, read_plan, write_plan

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
#: Name of the bundle folder inside a logged MLflow pyfunc model (``artifacts/bundle``).
BUNDLE_ARTIFACT = "bundle"


class ModelBundleError(Exception):
    """A model bundle is missing, incomplete or cannot be found in MLflow."""


@dataclass(frozen=True)
class ModelBundle:
    """A trained fold ensemble with its plan.

    Attributes:
        plan: preprocessing plan (spacing, normalisation, patch size, labels, network + options).
        fold_states: one ``state_dict`` per fold.
        postprocessing: ``{"largest_component": {label: {"apply": bool, ...}}}``, the per-label
            decision made on the out-of-fold Dice (``pipeline.inference.postprocessing``); ``{}`` = none.
        code_version: git commit of the training code.
        cv_mean_dice: cross-validation mean foreground Dice.
        name / version: registered model name and version ("" for a plain folder).
        calibration: ``{"temperature": T, "ece_before": e0, "ece_after": e1, "bins": 15, "voxels": n}``
            fitted on the out-of-fold voxels (``pipeline.calibration``); ``{}`` = uncalibrated.
        qc_reference: ``pipeline.qc_reference.QcReference.to_json()`` of the training cases; ``{}`` = none.
    """

    plan: Plan
    fold_states: tuple[dict[str, torch.Tensor], ...]
    postprocessing: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    cv_mean_dice: float = math.nan
    name: str = ""
    version: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    qc_reference: dict[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        """The calibration temperature (logits / T before softmax); 1.0 for an uncalibrated bundle."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def network(self) -> str:
        return self.plan.network

    @property
    def network_options(self) -> dict[str, Any]:
        return self.plan.network_options

    @property
    def label_names(self) -> dict[int, str]:
        """Foreground label value -> name (background excluded)."""
        return {k: v for k, v in self.plan.labels.items() if k != 0}

    @property
    def in_channels(self) -> int:
        return self.plan.in_channels

    @property
    def modality(self) -> str:
        """Modality of channel 0 ("CT", "MR", ...)."""
        return self.plan.modalities.get(0, "")

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.plan.patch_size

    @property
    def version_tag(self) -> str:
        """``NAME/vN`` for a registered bundle, else the code version."""
        return (
            f"{self.name}/v{self.version}"
            if self.name and self.version
            else (self.code_version or "unregistered")
        )

    def build_networks(self, device: str | torch.device = "cpu") -> list[nn.Module]:
        """One network per fold with its weights, in eval mode on ``device``."""
        from networks import build_network

        nets = []
        for fold, state in enumerate(self.fold_states):
            try:
                net = build_network(
                    self.plan.network, self.plan.in_channels, self.plan.num_classes, **self.plan.network_options
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise ModelBundleError(f"the bundle's network cannot be built: {exc}") from exc
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:  # missing/unexpected keys, shape mismatch
                raise ModelBundleError(
                    f"fold {fold}'s weights do not fit the bundle's network {self.plan.network!r} "
                    f"({str(exc)[:300]}); the weights belong to another architecture: export the bundle again"
                ) from exc
            nets.append(net.to(device).eval())
        return nets


def bundle_from_checkpoints(
    plan: Plan,
    checkpoints: list[str | Path],
    postprocessing: dict[str, Any] | None = None,
    cv_mean_dice: float = math.nan,
    calibration: dict[str, Any] | None = None,
    qc_reference: dict[str, Any] | None = None,
) -> ModelBundle:
    """Bundle the best checkpoints of the folds (``pipeline.training.trainer`` format: ``{"model": state_dict}``).

    ``calibration`` / ``qc_reference``: see :class:`ModelBundle` (``None`` = none).
    """
    states = []
    for path in checkpoints:
        if not Path(path).is_file():
            raise ModelBundleError(f"fold checkpoint {path} is missing; train that fold first")
        states.append(torch.load(path, map_location="cpu", weights_only=False)["model"])
        check_finite_weights(states[-1], str(path))
    return ModelBundle(
        plan,
        tuple(states),
        dict(postprocessing or {}),
        code_version(),
        cv_mean_dice,
        calibration=dict(calibration or {}),
        qc_reference=dict(qc_reference or {}),
    )


def check_finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights with NaN/Inf: such a network segments everything as background.

    Raises:
        ModelBundleError: naming ``where`` and the first non-finite tensor.
    """
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelBundleError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN/Inf (first: {bad[0]}); the fold diverged, "
            "retrain it (e.g. with a lower learning_rate) instead of bundling it"
        )


def save_bundle(bundle: ModelBundle, directory: str | Path) -> Path:
    """Write the bundle folder (each file atomically). Returns the folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_plan(bundle.plan, out / "plan.json")
    for i, state in enumerate(bundle.fold_states):
        with atomic_path(out / f"fold_{i}.pt") as tmp:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    meta = {
        "format": BUNDLE_FORMAT,
        "network": bundle.network,
        "network_options": bundle.network_options,
        "label_names": {str(k): v for k, v in bundle.label_names.items()},
        "code_version": bundle.code_version,
        "postprocessing": bundle.postprocessing,
        "num_folds": len(bundle.fold_states),
        "cv_mean_dice": None if math.isnan(bundle.cv_mean_dice) else bundle.cv_mean_dice,
        "calibration": bundle.calibration,
        "qc_reference": bundle.qc_reference,
    }
    write_text_atomic(out / "bundle.json", json.dumps(meta, indent=2))
    return out


def bundle_fingerprint(folder: str | Path) -> str:
    """A short hash of a bundle folder's content (plan, metadata, every fold's weights).

    Batch outputs record it, so a rerun with a different model redoes cases instead of keeping
    masks another model made. Hashing the weights, not the registry name, also catches a folder
    bundle that was overwritten in place.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted([folder / "bundle.json", folder / "plan.json", *folder.glob("fold_*.pt")]):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _read_bundle_folder(folder: Path) -> ModelBundle:
    meta = _read_json_object(folder / "bundle.json", folder)
    num_folds = meta.get("num_folds")
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 1:
        raise ModelBundleError(
            f"{folder / 'bundle.json'}: 'num_folds' must be a whole number >= 1, got {num_folds!r}; "
            "the bundle is damaged: download or export it again"
        )
    score = meta.get("cv_mean_dice")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ModelBundleError(f"{folder / 'bundle.json'}: 'cv_mean_dice' must be a number, got {score!r}")
    try:
        plan = read_plan(folder / "plan.json")
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ModelBundleError(f"{folder} is not a complete model bundle: plan.json: {exc!r}") from exc
    states = tuple(_read_fold_state(folder / f"fold_{i}.pt") for i in range(num_folds))
    registry = _read_json_object(folder / "registry.json", folder) if (folder / "registry.json").is_file() else {}
    return ModelBundle(
        plan,
        states,
        _read_postprocessing(meta, folder),
        meta.get("code_version", ""),
        math.nan if score is None else float(score),
        registry.get("name", ""),
        str(registry.get("version", "")),
        _read_calibration(meta, folder),
        _read_optional_object(meta, "qc_reference", folder),
    )


def _read_json_object(path: Path, folder: Path) -> dict[str, Any]:
    """A bundle's JSON file that must hold an object (``bundle.json``, ``registry.json``)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON, not UTF-8
        raise ModelBundleError(f"{folder} is not a complete model bundle: {path.name}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelBundleError(
            f"{path} holds a JSON {type(value).__name__}, not the object a medseg bundle writes; "
            "the bundle is damaged: download or export it again"
        )
    return value


def _read_optional_object(meta: dict[str, Any], key: str, folder: Path) -> dict[str, Any]:
    """``bundle.json[key]``, an object; ``{}`` when absent (bundles written before it existed)."""
    value = meta.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelBundleError(f"{folder / 'bundle.json'}: {key!r} must be an object, got {value!r}")
    return value


def _read_calibration(meta: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``bundle.json`` -> ``calibration``, with a positive finite temperature when present."""
    calibration = _read_optional_object(meta, "calibration", folder)
    t = calibration.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 < t < math.inf):
        raise ModelBundleError(
            f"{folder / 'bundle.json'}: calibration temperature must be a positive number, got {t!r}; "
            "the bundle is damaged: download or export it again"
        )
    return calibration


def _read_fold_state(path: Path) -> dict[str, torch.Tensor]:
    """One fold's ``state_dict``; any failure to unpickle it (random bytes, truncation) is a bundle error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, OSError...
        raise ModelBundleError(
            f"fold weights {path} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
            "the bundle is damaged: download or export it again"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelBundleError(f"fold weights {path} are not a state_dict of tensors")
    return state


def _read_postprocessing(meta: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``bundle.json`` -> ``postprocessing``, validated; no entry means no post-processing."""
    try:
        post = normalize_postprocessing(meta.get("postprocessing"), str(folder / "bundle.json"))
    except ValueError as exc:
        raise ModelBundleError(f"{folder} is not a usable model bundle: {exc}") from exc
    warn_legacy_postprocessing(post, str(folder))
    return post


def _find_bundle_folder(root: Path) -> Path | None:
    """The bundle itself, or the ``artifacts/bundle`` folder of a downloaded MLflow pyfunc model."""
    for candidate in (root, root / "artifacts" / BUNDLE_ARTIFACT):
        if (candidate / "bundle.json").is_file():
            return candidate
    return None


def resolve_bundle_dir(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Local bundle folder for a folder path, ``models:/NAME@alias``, ``models:/NAME/VERSION`` or ``runs:/ID/model``.

    MLflow URIs are downloaded into ``cache_dir`` (a temporary folder when ``None``); the
    registered name and version are recorded in ``registry.json`` there.

    Raises:
        ModelBundleError: nothing usable at ``uri``.
    """
    text = str(uri)
    local = Path(text)
    if "://" not in text and not text.startswith(("models:", "runs:")):
        folder = _find_bundle_folder(local) if local.is_dir() else None
        if folder is None:
            raise ModelBundleError(f"{uri}: no model bundle folder (bundle.json) there")
        return folder
    # One quick probe without retries first: MLflow's own backoff makes an unreachable server cost
    # minutes (256 s) before the download gives up.
    problem = check_tracking_reachable(tracking_uri())
    if problem:
        raise ModelBundleError(
            f"could not download model {uri}: MLflow at {tracking_uri()} is not reachable ({problem}); "
            "start the tracking server, set MLFLOW_TRACKING_URI, or pass a local bundle folder"
        )
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="medseg-bundle-"))
    if dst.exists():
        shutil.rmtree(dst)  # a stale download of another version must not be mixed in
    dst.mkdir(parents=True)

    # ``models:/`` URIs are resolved through MLflow's process-global *registry* URI, which an
    # earlier registration in this process may have pointed at another store: point it here.
    set_global_uri(tracking_uri())
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=text, dst_path=str(dst), tracking_uri=tracking_uri()
            )
        )
    except Exception as exc:  # MLflow raises several types for "not found" / "unreachable"
        raise ModelBundleError(
            f"could not download model {uri} from MLflow at {tracking_uri()}: {exc}"
        ) from exc
    folder = _find_bundle_folder(path)
    if folder is None:
        raise ModelBundleError(f"{uri} has no medseg bundle artifact")
    if text.startswith("models:/"):
        write_text_atomic(folder / "registry.json", json.dumps(_registry_info(text)))
    return folder


def _registry_info(uri: str) -> dict[str, str]:
    ref = uri[len("models:/") :]
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return {
            "name": name,
            "version": str(client.get_model_version_by_alias(name, alias).version),
            "alias": alias,
        }
    name, _, version = ref.partition("/")
    return {"name": name, "version": version}


def load_bundle(uri_or_dir: str | Path) -> ModelBundle:
    """Load a bundle from a folder or an MLflow URI (see :func:`resolve_bundle_dir`).

    An MLflow download goes to a temporary folder that is removed once the weights are in memory.
    """
    text = str(uri_or_dir)
    if "://" not in text and not text.startswith(("models:", "runs:")):
        return _read_bundle_folder(resolve_bundle_dir(text))
    with tempfile.TemporaryDirectory(prefix="medseg-bundle-") as tmp:
        return _read_bundle_folder(resolve_bundle_dir(text, cache_dir=Path(tmp) / "download"))
