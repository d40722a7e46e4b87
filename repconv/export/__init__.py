"""Export: verified ONNX (fp32 / fp16 / int8) from a plain (folded) module; TensorRT engines.

``repconv.export`` is both this package and the public function ``repconv.export(...)``: calling the
package calls :func:`repconv.api.export` (as ``repconv.convert`` does for convert).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from repconv.api import export  # deferred: api sits above this package

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
