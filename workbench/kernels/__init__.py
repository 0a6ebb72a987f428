"""The kernel layer: every implementation of a convolution behind one `Candidate` interface.

- ``base``: the interface (applicability, knobs, how to measure it on a device, how to emit it
  into a hybrid model, which following ops it can absorb).
- ``tvm_kernel``: what all TVM kernels share (a PrimFunc built for the device, uploaded, timed;
  a ``call_tir`` in the hybrid).
- ``nnpack``, ``default``, ``hand``, ``hand_tuned``, ``tuned``: NNPACK's algorithms x strategies,
  TVM's untuned conv, the hand-written TensorIR schedules with knobs, the knob tuner's best
  point of each conv, and MetaSchedule's best schedules.
  Kernels declare the ops around a conv they compute (``fusible``, ``prologue_fusible``);
  ``default`` and ``hand`` take a pool before and resize+add+ReLU after the conv.
- ``fused``: the original study's fused elementwise groups (MaxPool+ReLU, Resize+Add+ReLU)
  as kernels with knobs, measured with a ``GroupCase`` and emitted into a Relax build.
- ``registry``: the candidates of a study, and the one for an implementation id.

A new kind of kernel is one module here and one line in ``registry``.
"""

from .base import Candidate, Running

__all__ = ["Candidate", "Running"]
