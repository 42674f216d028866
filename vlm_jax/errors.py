"""Errors whose message is the whole report.

A `ReportedError` names the file, record, key, tensor or step at fault and what to do, so the command-line tools
print it as one line (`error: ...`) and exit 1, without a traceback (cli/args.py `reported_errors`); any other
exception is a bug and keeps its traceback."""


class ReportedError(Exception):
    """An error whose one-line message is the whole report."""


class InputError(ReportedError, ValueError):
    """Bad input the user can fix: a config, data file, record, checkpoint or workdir."""


class DivergedError(ReportedError, FloatingPointError):
    """Training stopped on non-finite values; the message names the step and the last (finite) checkpoint."""


class BadRecordError(InputError):
    """A data record that cannot be used: `where` names it (the file, the record's index and id), `reason` says why.
    The training stream raises it, or leaves the record out with data.on_bad_record=skip."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{where}: {reason}")
        self.reason, self.where = reason, where

    def __reduce__(self):
        return type(self), (self.reason, self.where)
