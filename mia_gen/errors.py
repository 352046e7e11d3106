"""User-facing errors: each message says what is wrong and what to do about it."""


class MiaGenError(Exception):
    """A problem with the user's input, config or assets that the user can fix.

    The message always names the problem and the fix (a path, a config switch, a command).
    """


class MissingAssetError(MiaGenError, FileNotFoundError):
    """A file the run needs (dataset, checkpoint, backbone weights) is not on this machine."""


class CorruptStoreError(MiaGenError):
    """A stored artefact (sample shard, checkpoint) is incomplete or damaged."""


class MissingExtraError(MiaGenError, ImportError):
    """A feature needs an optional dependency (a setup.cfg extra) that is not installed; the message
    gives the `pip install "mia-gen[...]"` line (`mia_gen.extras.require`)."""
