"""A script of benches/ (a folder of scripts, not a package) loaded as a module, for its tests."""
import importlib.util
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def load(name):
    """benches/<name>.py as a fresh module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
