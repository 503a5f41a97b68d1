"""The one error type of the model package."""
from common.errors import UserError


class ModelError(UserError, ValueError):
    """A model config a user can fix (unknown arch, refused family/size/mode, missing or incompatible weights)."""
