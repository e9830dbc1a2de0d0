"""jacplug inside torchdistill's own training loop and configs, on :class:`jacplug.Distiller`.

A config lists this package under ``dependencies:``; importing it registers the bridge's keys in
torchdistill (:mod:`~jacplug.integrations.torchdistill.registration`). The student's forward procedure
runs one Distiller step (:mod:`~jacplug.integrations.torchdistill.procedures`), the loss adapters read
its result (:mod:`~jacplug.integrations.torchdistill.losses`), the epoch pieces log each term and feed
``ReduceLROnPlateau`` (:mod:`~jacplug.integrations.torchdistill.epoch`), and
``python -m jacplug.integrations.torchdistill.run`` trains a config the way torchdistill's example script
does (:mod:`~jacplug.integrations.torchdistill.run`). docs/torchdistill.md shows a complete config.
"""

try:
    import torchdistill  # noqa: F401  (only to fail early with an install hint)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jacplug.integrations.torchdistill needs torchdistill; install it with: pip install 'jacplug[torchdistill]'"
    ) from exc

from .registration import TorchdistillNameCollision, create_model, digits_dataset, register_with_torchdistill
from .step import BridgeConfigError

__all__ = ["BridgeConfigError", "TorchdistillNameCollision", "create_model", "digits_dataset",
           "register_with_torchdistill"]

register_with_torchdistill()
