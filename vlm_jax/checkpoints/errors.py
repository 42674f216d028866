"""The one error type of bad checkpoint or conversion input (interop raises it too, as keymap.ConversionError)."""

from vlm_jax.errors import InputError


class ConversionError(InputError):
    """Bad input: the message names every offending file, key and shape."""
