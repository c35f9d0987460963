"""scaling: a measured multi-GPU scaling study of TensorFlow, PyTorch, Lightning and Horovod."""
from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

#: Subpackages kept in the repository's top-level folders (``launch/``, ``conf/``, ``slurm/``).
#: pyproject.toml's ``package-dir`` maps the same folders into a wheel, where they are plain
#: subfolders of ``scaling``; tests/test_wheel.py checks that the two maps agree.
SOURCE_FOLDERS = {"scaling.launch": "launch", "scaling.conf": "conf", "scaling.templates": "slurm"}

_HERE = Path(__file__).resolve().parent
#: The source checkout this package is imported from (on PYTHONPATH or installed editable), or
#: None for an installed wheel.
CHECKOUT: Path | None = (_HERE.parent if not (_HERE / "launch").is_dir() and (_HERE.parent / "pyproject.toml").is_file()
                         and (_HERE.parent / "launch" / "__init__.py").is_file() else None)


class _CheckoutFolders:
    """Imports SOURCE_FOLDERS' subpackages from this checkout's folders. Placed first on
    ``sys.meta_path`` so a checkout on PYTHONPATH never picks up another checkout's ``launch/``
    through an editable install's finder."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None):  # noqa: ANN205 (importlib protocol)
        folder = SOURCE_FOLDERS.get(fullname)
        if folder is None or CHECKOUT is None:
            return None
        from importlib.util import spec_from_file_location

        location = CHECKOUT / folder
        return spec_from_file_location(fullname, location / "__init__.py", submodule_search_locations=[str(location)])


if CHECKOUT is not None and not any(getattr(f, "__name__", "") == "_CheckoutFolders" for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFolders)
