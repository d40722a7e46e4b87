"""Recovering and training: data, calibration, the training loop (finetune / train, DDP, resume).

``repconv.train`` is both this package and the public function ``repconv.train(...)``: calling the
package calls :func:`repconv.api.train` (the same arrangement as ``repconv.convert``).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from repconv.api import train  # deferred: api sits above this package

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
