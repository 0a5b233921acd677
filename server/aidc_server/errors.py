"""Errors the protocol layer turns into HTTP responses ({"error": message})."""


class ServingError(Exception):
    """An error with the HTTP status it maps to; the message is shown to the client."""

    status_code = 500

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class InvalidInput(ServingError):
    """The client sent something we cannot serve (400)."""

    status_code = 400


class NotFound(ServingError):
    status_code = 404


class PayloadTooLarge(ServingError):
    status_code = 413


class ModelNotReady(ServingError):
    """No verified model loaded (yet), or the server is draining (503)."""

    status_code = 503
