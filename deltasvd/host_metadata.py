"""The header keys A1111, kohya tools and Civitai read from a LoRA file (ss_*, modelspec.*)."""

import datetime

from .checkpoint import ARCHITECTURE, BASE_MODEL_VERSION


def host_metadata(family, output_name, data_sha256, description=""):
    """`data_sha256` is the hash of the file's tensor data: A1111's addnet hash of this file,
    which kohya's trainers record as `sshs_model_hash`."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic",
        "ss_network_alpha": "Dynamic",
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": output_name,
        "sshs_model_hash": data_sha256,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[family]}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": output_name,
        "modelspec.description": description,
        "modelspec.date": datetime.date.today().isoformat(),
    }
