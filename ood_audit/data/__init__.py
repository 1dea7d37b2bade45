"""Data layer: named data sets, user files, the shape rule and the pixel conventions.

- :class:`ImageSet` (images.py): uint8 [N, C, H, W] images + int64 labels.
- :data:`DATASETS`, :func:`load_dataset`, :func:`data_root` (registry.py).
- :func:`adapt_to_shape` (adapt.py): the one rule fitting an OOD set to a model.
- :data:`TRANSFORMS`, :func:`parse_transform` (transforms.py): grayscale, contrast=ALPHA,
  invert, applied to uint8 images before dequantization (``score --transform``).
- :func:`dequantize`, :func:`bits_per_dim`, :func:`discrete_log_likelihood_bound`
  (preprocess.py): the conventions of Nalisnick et al. (2019), written once.
"""

from .adapt import adapt_to_shape
from .images import ImageSet
from .preprocess import N_BINS, bits_per_dim, dequantize, discrete_log_likelihood_bound
from .registry import DATASETS, DatasetSpec, data_root, load_dataset
from .transforms import TRANSFORMS, Transform, parse_transform, parse_transforms
from .user_files import load_user_data

__all__ = [
    "DATASETS",
    "N_BINS",
    "TRANSFORMS",
    "Transform",
    "DatasetSpec",
    "ImageSet",
    "adapt_to_shape",
    "bits_per_dim",
    "data_root",
    "dequantize",
    "discrete_log_likelihood_bound",
    "load_dataset",
    "load_user_data",
    "parse_transform",
    "parse_transforms",
]
