"""Dependencies inside Slicer (`install.py`): what is missing, never installing in testing mode,
asking first, and a package installed by pip being importable at once."""
import sys

import pytest
import slicer

from MedSapiensLandmarksLib import install


@pytest.fixture
def fake_kind(monkeypatch):
    """A kind of work that needs one package no environment has, under a fresh import name."""
    monkeypatch.setitem(install.NEEDS, "demo", {"medsapiens_demo_pkg": "medsapiens-demo-pkg>=1"})
    return "demo"


@pytest.fixture
def pip(monkeypatch, tmp_path):
    """Slicer's pip_install, recorded; it 'installs' by writing the module onto sys.path."""
    calls = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def pip_install(requirements):
        calls.append(list(requirements))
        (tmp_path / "medsapiens_demo_pkg.py").write_text("VERSION = 1\n")

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    return calls


def test_missing_packages_names_what_is_not_installed(fake_kind):
    assert install.missing_packages("onnx") == []  # onnxruntime is in the test environment
    assert install.missing_packages(fake_kind) == ["medsapiens_demo_pkg"]


def test_testing_mode_never_installs(fake_kind, pip):
    assert install.ensure_dependencies(fake_kind, ask=False, testing=True) is False
    assert pip == []
    assert install.ensure_dependencies("onnx", testing=True) is True  # nothing missing: go on


def test_a_declined_question_installs_nothing(fake_kind, pip, monkeypatch):
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: asked.append(text) or False,
                        raising=False)
    assert install.ensure_dependencies(fake_kind, ask=True) is False
    assert pip == [] and asked == ["MedSapiensLandmarks needs these Python packages: medsapiens-demo-pkg>=1. "
                                   "Install them now?"]


def test_an_accepted_install_is_importable_at_once(fake_kind, pip, monkeypatch):
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: True, raising=False)
    assert install.ensure_dependencies(fake_kind, ask=True) is True
    assert pip == [["medsapiens-demo-pkg>=1"]]
    import medsapiens_demo_pkg  # noqa: F401  (the caches were invalidated)
    sys.modules.pop("medsapiens_demo_pkg", None)


def test_torch_without_the_pytorch_extension_says_where_to_get_it(monkeypatch):
    monkeypatch.setattr(install, "missing_packages", lambda kind: ["torch", "torchvision"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    with pytest.raises(RuntimeError, match="install the 'PyTorch' extension from the Extensions Manager"):
        install.ensure_dependencies("torch", ask=False)
