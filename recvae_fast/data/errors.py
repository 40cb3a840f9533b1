"""The one exception type of the data package."""


class DataError(ValueError):
    """Bad input data (missing file, unknown columns, unparsable values, nothing left, a corrupt
    saved split). The message is one line naming the file and the problem."""
