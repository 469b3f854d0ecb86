"""ComfyUI entry point of the Delta-SVD node pack.

ComfyUI imports this file as a package; pytest and `python -m deltasvd` never need it. The
node modules import ComfyUI, so they are only loaded when ComfyUI is the importer."""

try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./javascript"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
