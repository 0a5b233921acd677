"""kopf handlers; importing this package registers them."""

from . import inferenceservice, trainingjob  # noqa: F401
