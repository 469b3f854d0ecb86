"""sd_models.checkpoints_list: title -> CheckpointInfo (with .filename), as A1111 keeps it."""


class CheckpointInfo:
    def __init__(self, filename, title):
        self.filename, self.title = filename, title


checkpoints_list = {}
