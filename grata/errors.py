"""Errors that are the user's to fix: the command line prints them as one line, no traceback."""


class GrataError(Exception):
    """A user-facing problem (bad input, missing file, wrong option); message is one line."""


class DataError(GrataError):
    """A file of the data set cannot be used; inside a stream the sample is skipped."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
