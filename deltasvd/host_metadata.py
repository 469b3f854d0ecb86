"""The header keys A1111, kohya tools and Civitai read from a LoRA file (ss_*, modelspec.*)."""

import datetime

from . import families


def host_metadata(family, output_name, data_sha256, description=""):
    """`data_sha256` is the hash of the file's tensor data: A1111's addnet hash of this file,
    which kohya's trainers record as `sshs_model_hash`."""
    named = families.family(family).host_metadata()
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic",
        "ss_network_alpha": "Dynamic",
        "ss_base_model_version": named["ss_base_model_version"],
        "ss_v2": named["ss_v2"],
        "ss_output_name": output_name,
        "sshs_model_hash": data_sha256,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": named["modelspec.architecture"],
        "modelspec.implementation": named["modelspec.implementation"],
        "modelspec.title": output_name,
        "modelspec.description": description,
        "modelspec.date": datetime.date.today().isoformat(),
    }
