"""The embedded data sets, all built from scikit-learn's bundled digits (no download).

- :mod:`pycompress.data.digits`: the 8x8 digits as a classification task.
- :mod:`pycompress.data.detection`: generated multi-digit canvases with boxes, for the detectors.
"""

from pycompress.data.detection import (DetectionDataset, DigitDetectionSplits, digit_detection,
                                       digit_detection_splits, to_coco)
from pycompress.data.digits import DigitsSplits, digits_splits, load_digits_tensors, stratified_subset

__all__ = ["DigitsSplits", "digits_splits", "load_digits_tensors", "stratified_subset",
           "DetectionDataset", "DigitDetectionSplits",
           "digit_detection", "digit_detection_splits", "to_coco"]
