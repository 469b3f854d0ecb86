"""A1111 / Forge installer: installs only what is missing, through the host's own pip."""

import importlib.util

import launch  # provided by A1111 / Forge when it runs this file

REQUIREMENTS = {"safetensors": "safetensors", "numpy": "numpy", "tqdm": "tqdm"}

for module, package in REQUIREMENTS.items():
    if importlib.util.find_spec(module) is None and not launch.is_installed(package):
        launch.run_pip(f"install {package}", f"{package} for Delta-SVD")
