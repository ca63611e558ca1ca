class CalibrationError(Exception):
    """Bad input or an unsupported model: the CLI prints the message on one line and exits non-zero."""
