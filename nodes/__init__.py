"""ComfyUI nodes (thin glue over deltasvd/). Filled in by the node pack work."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
