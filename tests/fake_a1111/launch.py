"""A1111's `launch` module as install.py uses it: is_installed and run_pip, recorded."""

installed = set()
pip_calls = []


def is_installed(package):
    return package in installed


def run_pip(command, desc=None):
    pip_calls.append(command)
