"""kopf handlers; importing this package registers them."""

from . import inferenceservice, trainingjob, wiring  # noqa: F401
