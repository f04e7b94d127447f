"""The one exception type users see: a one-line message naming the problem and the fix."""

_WORKER_PREFIX = "Caught RWKVDishaError in DataLoader worker process"
_LAST_LINE = "rwkv_disha.errors.RWKVDishaError: "


class RWKVDishaError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    One raised in a DataLoader worker process (bad data met while training) reaches the main process
    rebuilt by torch from "Caught RWKVDishaError in DataLoader worker process N" and the worker's whole
    traceback; it keeps only the original message, so the user still sees that one line."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith(_WORKER_PREFIX):
            head, sep, message = args[0].rpartition(_LAST_LINE)
            if sep:
                args = (message.strip(),)
        super().__init__(*args)
