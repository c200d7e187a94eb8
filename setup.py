"""The wheel carries the embedded models as package data (``MedSapiensLandmarksLib/models``)."""
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).parent / "MedSapiensLandmarks" / "Resources" / "Models"
sys.path.insert(0, str(MODELS.parents[1]))
from MedSapiensLandmarksLib.catalog import EMBEDDED, INDEX_NAME  # noqa: E402  (no third-party imports)


class BuildWithModels(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "MedSapiensLandmarksLib" / "models"
        for name in EMBEDDED:
            shutil.copytree(MODELS / name, target / name, dirs_exist_ok=True)
        shutil.copyfile(MODELS / INDEX_NAME, target / INDEX_NAME)


setup(cmdclass={"build_py": BuildWithModels})
