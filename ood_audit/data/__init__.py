"""Data layer: named data sets, user files, the shape rule and the pixel conventions.

- :class:`~.images.ImageSet` (images.py): uint8 [N, C, H, W] images + int64 labels.
- :data:`~.registry.DATASETS`, :func:`~.registry.load_dataset`,
  :func:`~.registry.data_root` (registry.py; torch-free, loaders imported on first use).
- :func:`~.adapt.adapt_to_shape` (adapt.py): the one rule fitting an OOD set to a model.
- :data:`~.transforms.TRANSFORMS`, :func:`~.transforms.parse_transform` (transforms.py):
  grayscale, contrast=ALPHA, invert, applied to uint8 images before dequantization
  (``score --transform``).
- :func:`~.preprocess.dequantize`, :func:`~.preprocess.bits_per_dim`,
  :func:`~.preprocess.discrete_log_likelihood_bound` (preprocess.py): the conventions of
  Nalisnick et al. (2019), written once.

This file imports nothing: ``import ood_audit.data.registry`` (the CLI's choices) must
not pull in torch. Import from the modules.
"""

import importlib

#: Public names and the module that defines each, imported on first access (PEP 562):
#: ``from ood_audit.data import load_dataset`` works, and ``import ood_audit.data.registry``
#: (the CLI's choices) does not pull in torch.
_EXPORTS = {
    "ImageSet": "images", "DATASETS": "registry", "DatasetSpec": "registry",
    "data_root": "registry", "load_dataset": "registry", "adapt_to_shape": "adapt",
    "TRANSFORMS": "transforms", "Transform": "transforms", "parse_transform": "transforms",
    "parse_transforms": "transforms", "N_BINS": "preprocess", "bits_per_dim": "preprocess",
    "dequantize": "preprocess", "discrete_log_likelihood_bound": "preprocess",
    "load_user_data": "user_files",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
