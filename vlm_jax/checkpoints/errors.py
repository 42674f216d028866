"""The one error type of bad checkpoint or conversion input (interop raises it too, as keymap.ConversionError)."""


class ConversionError(ValueError):
    """Bad input: the message names every offending file, key and shape."""
