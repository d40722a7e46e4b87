"""The torch.fx work: tracing, plans, the two passes and folding.

``repconv.convert`` is both this package and the public function ``repconv.convert(...)`` (the issue
tracker asks for both names): calling the package calls :func:`repconv.api.convert`.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from repconv.api import convert  # deferred: api sits above this package

        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
