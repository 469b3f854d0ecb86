"""Any architecture nobody registered: every tensor under ComfyUI's generic LoRA names (see
base.py), groups by the first part of the key path. Recognises every file, so it comes last:
a pair is refused only when its two files do not match."""

from .base import Family


class Generic(Family):
    name = "generic"
    title = "an unregistered architecture (generic)"
    architecture = "unknown"
    base_model_version = "unknown"
    civitai = "Other"

    def recognise(self, view):
        return True

    @property
    def group_order(self):
        return []       # groups appear in the order the keys bring them

    def unet_group(self, path):
        return path.split(".", 1)[0] if "." in path else "other"
