"""The model bundle in the MLflow registry: registration with a champion alias, and the pyfunc model.

:func:`register_bundle` logs a :class:`~pipeline.bundle.ModelBundle` as the ``bundle`` artifact
(:data:`pipeline.bundle.BUNDLE_ARTIFACT`) of a pyfunc model (:class:`MedsegPyfuncModel`) and registers a
new version, so ``load_bundle("models:/NAME@champion")`` and ``mlflow.pyfunc.load_model(...)`` both
work from the registry alone.

Pyfunc input format (``model.predict(model_input)``): a dict with

* ``"image"``: float array ``(X, Y, Z)`` or ``(C, X, Y, Z)`` in the bundle's intensity units (CT in HU),
* ``"spacing_mm"``: 3 numbers, voxel spacing along X, Y, Z (axes assumed to point along R, A, S), or
* ``"affine_ras"`` (optional, instead of ``spacing_mm``): 4x4 voxel -> RAS mm affine,

or a one-row ``pandas.DataFrame`` with those columns. Output: ``uint8`` label map ``(X, Y, Z)`` on
the input grid.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, replace
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from pipeline.bundle import BUNDLE_ARTIFACT, ModelBundle, check_finite_weights, load_bundle, save_bundle
from pipeline.inference.config import inference_config_for
from pipeline.inference.segment import Segmenter
from pipeline.tracking import Tracker, set_global_uri
from preprocessing.image import Volume

logger = logging.getLogger(__name__)

#: The registry alias that ``medseg predict --model models:/NAME@champion`` resolves.
CHAMPION = "champion"


@dataclass(frozen=True)
class RegistrationInfo:
    """Result of :func:`register_bundle`."""

    version: str
    is_champion: bool
    champion_version: str


def register_bundle(
    bundle: ModelBundle, tracker: Tracker, model_name: str, cv_mean_dice: float
) -> RegistrationInfo:
    """Log the bundle as a pyfunc model in ``tracker``'s run and register a new version of ``model_name``.

    The version is tagged with its ``cv_mean_dice``; alias ``champion`` moves to it only if that
    beats the current champion's tag (or there is no champion).

    Raises:
        ModelBundleError: a fold's weights hold NaN/Inf (nothing is logged or registered).
    """
    for i, state in enumerate(bundle.fold_states):
        check_finite_weights(state, f"model bundle for {model_name}, fold {i}")
    set_global_uri(tracker.uri)  # mlflow.pyfunc.log_model only speaks MLflow's process-global URIs
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_bundle(replace(bundle, cv_mean_dice=cv_mean_dice), Path(tmp) / BUNDLE_ARTIFACT)
        # Explicit requirements: MLflow's inference would import the model in a subprocess (slow).
        reqs = [f"{p}=={pkg_version(p)}" for p in ("torch", "monai", "numpy", "scipy", "nibabel")]
        with mlflow.start_run(run_id=tracker.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MedsegPyfuncModel(),
                artifacts={BUNDLE_ARTIFACT: str(folder)},
                registered_model_name=model_name,
                pip_requirements=reqs,
            )
    version = str(info.registered_model_version)
    client = _registry_client(tracker)
    client.set_model_version_tag(model_name, version, "cv_mean_dice", f"{cv_mean_dice:.6f}")
    client.set_model_version_tag(model_name, version, "network", bundle.network)
    client.set_model_version_tag(model_name, version, "code_version", bundle.code_version)
    champion = _champion(client, model_name)
    if champion is None or cv_mean_dice > champion[1]:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        logger.info(
            "%s version %s is the new champion (cv_mean_dice %.4f)", model_name, version, cv_mean_dice
        )
        return RegistrationInfo(version, True, version)
    logger.info(
        "%s version %s (%.4f) does not beat champion version %s (%.4f)",
        model_name,
        version,
        cv_mean_dice,
        champion[0],
        champion[1],
    )
    return RegistrationInfo(version, False, champion[0])


def _registry_client(tracker: Tracker) -> MlflowClient:
    """A registry client on the tracker's store (the same URIs :class:`~pipeline.tracking.Tracker` uses).

    Made here rather than borrowed from the tracker: model registration is this module's concern,
    and the tracker's client stays private to :mod:`pipeline.tracking`.
    """
    return MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)


def _champion(client: MlflowClient, model_name: str) -> tuple[str, float] | None:
    """``(version, cv_mean_dice)`` of the current champion, or ``None``."""
    try:
        mv = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), float(mv.tags.get("cv_mean_dice", "-inf"))


# MLflow warns at class creation that ``predict`` lacks type hints; they are left out on purpose
# (below). MLflow forces its own "once" filter around that check, so a filter cannot silence it;
# muting the display for the duration of the class statement keeps every importing process quiet.
_show_warning = warnings.showwarning
warnings.showwarning = lambda *args, **kwargs: None
try:

    class MedsegPyfuncModel(PythonModel):
        """MLflow pyfunc wrapper: predicts a label map from an image array and its spacing (module docstring)."""

        def load_context(self, context: Any) -> None:
            self.bundle = load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.networks = self.bundle.build_networks(self.device)

        # No type hints on predict: MLflow would turn them into an input schema and reject a dict of arrays.
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            image, affine = _parse_pyfunc_input(model_input)
            volume = Volume(image, affine, case_id="pyfunc-input", modality=self.bundle.modality)
            config = inference_config_for(self.bundle.plan, device=self.device)
            segmenter = Segmenter(self.bundle.plan, self.networks, self.bundle.postprocessing, config)
            return segmenter(volume).labels
finally:
    warnings.showwarning = _show_warning


def _parse_pyfunc_input(model_input: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pyfunc input (module docstring) -> ``(image (C, X, Y, Z) float32, affine 4x4 RAS mm float64)``.

    Raises:
        ValueError: not a dict / one-row DataFrame with ``image``, a wrong image rank, or no geometry.
    """
    if hasattr(model_input, "iloc"):  # pandas DataFrame: first row
        model_input = {k: model_input[k].iloc[0] for k in model_input.columns}
    if not isinstance(model_input, dict) or "image" not in model_input:
        raise ValueError(
            "pyfunc input must be a dict (or one-row DataFrame) with 'image' and 'spacing_mm' or 'affine_ras'"
        )
    image = np.asarray(model_input["image"], dtype=np.float32)
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4:
        raise ValueError(f"'image' must be (X, Y, Z) or (C, X, Y, Z); got shape {image.shape}")
    if model_input.get("affine_ras") is not None:
        affine = np.asarray(model_input["affine_ras"], dtype=np.float64).reshape(4, 4)
    elif model_input.get("spacing_mm") is not None:
        affine = np.diag([*np.asarray(model_input["spacing_mm"], dtype=np.float64).reshape(3), 1.0])
    else:
        raise ValueError("pyfunc input needs 'spacing_mm' (3 numbers) or 'affine_ras' (4x4)")
    return image, affine
