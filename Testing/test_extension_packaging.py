"""Slicer extension packaging: CMake lists, index files, icon, UI <-> widget bindings."""
import ast
import json
import re
import xml.etree.ElementTree as ET

from PIL import Image

from conftest import ROOT

MODULE = ROOT / "MedSapiensLandmarks"


def cmake_list(text, variable):
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return {line.strip().replace("${MODULE_NAME}", "MedSapiensLandmarks")
            for line in block.splitlines() if line.strip()}


def test_every_module_file_is_listed_in_the_module_cmakelists():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    on_disk_res = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert on_disk_py == scripts
    assert on_disk_res == resources
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_top_level_cmake_and_index_entries():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(MedSapiensLandmarks)" in text
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        value = re.search(rf'set\(EXTENSION_{var} "([^"]+)"\)', text)
        assert value and value.group(1).strip(), var
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    for line in ("find_package(Slicer REQUIRED)", "add_subdirectory(MedSapiensLandmarks)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    fields = dict(line.split(" ", 1) for line in (ROOT / "MedSapiensLandmarks.s4ext").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert fields.get(key, "").strip(), key
    entry = json.loads((ROOT / "MedSapiensLandmarks.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry) and "slicer" in entry["scm_url"].lower()
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    with Image.open(MODULE / "Resources" / "Icons" / "MedSapiensLandmarks.png") as icon:
        assert icon.size == (128, 128)


def test_widget_names_and_parameter_bindings_exist_in_the_ui():
    ui = ET.parse(MODULE / "Resources" / "UI" / "MedSapiensLandmarks.ui").getroot()
    names = {w.get("name") for w in ui.iter("widget")}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    source = (MODULE / "MedSapiensLandmarks.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used <= names, used - names
    tree = ast.parse(source)
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("ParameterNode"))
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert bound == fields
    # the Logic class of the module imports no Qt: everything it runs lives in the Lib
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSapiensLandmarksLogic")
    assert "qt." not in ast.get_source_segment(source, logic)


def test_icon_and_screenshot_urls_point_at_images_in_this_repository():
    """The Extensions Index fetches these URLs: each must name an image that exists here."""
    text = (ROOT / "CMakeLists.txt").read_text()
    s4ext = (ROOT / "MedSapiensLandmarks.s4ext").read_text()
    urls = []
    for var in ("ICONURL", "SCREENSHOTURLS"):
        urls += re.search(rf'set\(EXTENSION_{var} "([^"]+)"\)', text).group(1).split()
    for url in urls:
        assert url in s4ext, f"{url} differs between CMakeLists.txt and the .s4ext"
        path = ROOT / url.split("/main/", 1)[1]
        assert path.is_file() and path.parts[len(ROOT.parts)] == "Resources", url
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 128
