"""Reference models, sized for the embedded 8x8 digits by default and scalable
(``width``, input size) for benchmarks. Each exercises a graph pattern that
pruning and sparsification must handle: plain chains (VGG), residual adds
(ResNet), depthwise convs (MobileNet) and channel concatenation (Inception).
"""

from pycompress.models.nets import ConcatNet, MobileNetStyle, ResNetStyle, VGGStyle, student_cnn, teacher_cnn

__all__ = ["VGGStyle", "ResNetStyle", "MobileNetStyle", "ConcatNet", "teacher_cnn", "student_cnn"]
from pycompress.models.detection import build_detector, detector_names, register_detector  # noqa: E402

__all__ += ["build_detector", "detector_names", "register_detector"]
