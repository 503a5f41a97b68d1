"""The one error type of the model package."""


class ModelError(ValueError):
    """A model config a user can fix (unknown arch, refused family/size/mode, missing or incompatible weights)."""
