"""User-facing errors: one clear line naming the file or field, turned into a non-zero exit by the CLI."""


class HarnessError(Exception):
    """A problem with the user's input or environment; the message is shown as-is, without a traceback."""
