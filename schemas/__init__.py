"""The one contract every service imports: wire messages and subject names."""

from schemas.messages import *  # noqa: F401,F403
from schemas.messages import WIRE_MESSAGES
from schemas.subjects import Subjects, token  # noqa: F401

__all__ = [m.__name__ for m in WIRE_MESSAGES] + ["Subjects", "token"]
