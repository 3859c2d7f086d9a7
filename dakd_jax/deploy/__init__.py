"""Deployment: the trained network as ONNX and StableHLO files that load without dakd_jax.

`export_extractor(model, variables, ...)` writes and verifies <out_dir>/extractor.onnx,
extractor.stablehlo and manifest.json (`export.py`); `extractor_function` is the function both
files compute (`extractor.py`); `verify_export` checks an export directory (`verify.py`). The
ONNX steps need the optional `export` extra (`packages.py`); importing this package does not.
"""
from dakd_jax.deploy.export import export_extractor
from dakd_jax.deploy.extractor import extractor_function
from dakd_jax.deploy.packages import check_export_packages
from dakd_jax.deploy.packages import ExportError
from dakd_jax.deploy.packages import MISSING_EXTRA_MESSAGE
from dakd_jax.deploy.verify import load_artefacts
from dakd_jax.deploy.verify import verify_export

__all__ = ["export_extractor", "extractor_function", "check_export_packages", "ExportError",
           "MISSING_EXTRA_MESSAGE", "load_artefacts", "verify_export"]
