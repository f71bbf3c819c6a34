"""botkit's errors. Each message is one sentence that tells the user what to do; the CLI and the
adapters show `str(error)` and never a traceback."""


class BotkitError(Exception):
    """Base class: something the user can fix, explained in one sentence."""


class ConfigError(BotkitError):
    """The config file or a setting is wrong."""


class ModelLoadError(BotkitError):
    """The model could not be found or loaded."""


class InputError(BotkitError):
    """A parameter or a message is not acceptable."""


class DatasetError(BotkitError):
    """A fine-tuning dataset cannot be used."""


class BusyError(BotkitError):
    """The queue is full; try again later."""


class StoreUnavailable(BusyError):
    """The database cannot record anything right now (busy, disk full, read-only)."""


class RateLimitedError(BotkitError):
    """This user or chat sent too many requests recently."""


class GenerationError(BotkitError):
    """Generation failed for this request (the reason is in the message and the store)."""


class RequestTimeout(GenerationError):
    """The request did not finish within its time limit."""


class RequestCancelled(GenerationError):
    """The request was cancelled before it finished."""
