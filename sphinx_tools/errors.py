"Exceptions shown to users. The CLI turns SphinxToolsError into a clean message."


class SphinxToolsError(Exception):
    "Base class: the message is meant for the user."


class CheckpointError(SphinxToolsError):
    "A checkpoint folder or shard is missing, incomplete, corrupt or does not fit the model."


class UnknownTaskError(SphinxToolsError, KeyError):
    "No task with this name is registered."

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
