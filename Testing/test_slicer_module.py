"""What can be checked of the Slicer extension without Slicer: the .ui against the code and the parameter node,
the CMake lists against the files, the catalog entry against the ExtensionsIndex schema's facts, import hygiene,
and that every command line the panel's logic builds is one the real CLI accepts."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

MODULE = REPO / "RubikSSL"
MODULE_SOURCE = MODULE / "RubikSSL.py"
PARTS = MODULE / "RubikSSLModuleLib"
MODULE_FILES = [MODULE_SOURCE, *sorted(PARTS.glob("*.py"))]
UI = MODULE / "Resources" / "UI" / "RubikSSL.ui"

# parameterNodeWrapper's GUI connectors match the EXACT widget class (Slicer: Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
WIDGETS_FOR_TYPE = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
            "ctkDoubleSpinBox", "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit", "QComboBox", "ctkComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}
COMBO_BOXES = {"QComboBox", "ctkComboBox"}
NODE_COMBOS = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox"}


def module_tree(path: Path = MODULE_SOURCE) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def module_classes() -> dict[str, ast.ClassDef]:
    """Every class of the module file and its parts, by name."""
    return {n.name: n for path in MODULE_FILES for n in module_tree(path).body if isinstance(n, ast.ClassDef)}


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of RubikSSLParameterNode."""
    node = module_classes()["RubikSSLParameterNode"]
    return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}


def base_type(annotation: str) -> str:
    inner = re.match(r"Annotated\[(\w+)", annotation)
    name = inner.group(1) if inner else annotation
    return "node" if name.startswith("vtkMRML") else name


def ui_widgets() -> list[ET.Element]:
    return list(ET.parse(UI).getroot().iter("widget"))


def test_ui_root_and_unique_names() -> None:
    root = ET.parse(UI).getroot()
    assert root.findtext("class") == "RubikSSL"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "RubikSSL"
    names = [w.get("name") for w in ui_widgets()]
    assert len(names) == len(set(names)), "duplicate object names in the .ui"


def test_every_ui_attribute_the_code_uses_exists() -> None:
    used = {name for path in MODULE_FILES for name in re.findall(r"self\.ui\.(\w+)", path.read_text(encoding="utf-8"))}
    classes = {w.get("name"): w.get("class") for w in ui_widgets()}
    assert used, "the widget uses no ui attributes?"
    assert not used - classes.keys(), f"used in RubikSSL.py but missing from the .ui: {sorted(used - classes.keys())}"
    expected = {"progressBar": "QProgressBar", "logTextEdit": "QPlainTextEdit", "statusLabel": "QLabel",
                "pretrainVolumesSelector": "qMRMLCheckableNodeComboBox"}
    for name, cls in expected.items():
        assert classes[name] == cls
    for name in used:
        if name.endswith("Button") and not name.endswith("CollapsibleButton"):
            assert classes[name] == "QPushButton", name


def test_every_parameter_binding_names_a_field_with_a_compatible_widget() -> None:
    fields = parameter_fields()
    bound = {}
    for widget in ui_widgets():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be a dynamic property"
                bound[prop.findtext("string")] = widget.get("class")
            elif prop.get("stdset") == "0":
                pytest.fail(f"{widget.get('name')}: stray dynamic property {prop.get('name')!r} (a typo of SlicerParameterName?)")
    assert not bound.keys() - fields.keys(), f"bound to missing fields: {sorted(bound.keys() - fields.keys())}"
    synced = path_fields()  # plain strings the widget syncs with a ctkPathLineEdit itself ("" shows as empty)
    assert not fields.keys() - bound.keys() - synced.keys(), f"fields without a widget: {sorted(fields.keys() - bound.keys() - synced.keys())}"
    classes = {w.get("name"): w.get("class") for w in ui_widgets()}
    for name, widget in synced.items():
        assert fields[name] == "str" and name not in bound and classes[widget] == "ctkPathLineEdit", name
    for name, widget_class in bound.items():
        kind = base_type(fields[name])
        assert widget_class in WIDGETS_FOR_TYPE[kind], f"{name}: {widget_class} cannot show a {kind}"
        if widget_class in COMBO_BOXES:
            assert "Choice(" in fields[name], f"{name}: a combo box needs a Choice annotation"


def test_the_panels_task_list_is_the_librarys() -> None:
    from RubikSSLLib import tasks

    assert re.findall(r"""['"]([\w+]+)['"]""", parameter_fields()["pretrainTask"]) == tasks.names()


def test_node_combo_boxes_have_the_scene_and_valid_node_types() -> None:
    root = ET.parse(UI).getroot()
    connected = {(c.findtext("receiver"), c.findtext("signal"), c.findtext("slot")) for c in root.iter("connection")
                 if c.findtext("sender") == "RubikSSL"}
    combos = [w for w in ui_widgets() if w.get("class") in NODE_COMBOS]
    assert len(combos) >= 4
    for combo in combos:
        name = combo.get("name")
        assert (name, "mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)") in connected, name
        node_types = [s.text for p in combo.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
        assert node_types and all(re.fullmatch(r"vtkMRML\w+Node", t) for t in node_types), name


def test_custom_widgets_are_declared() -> None:
    root = ET.parse(UI).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert not custom - declared, f"undeclared custom widgets: {custom - declared}"


def test_module_classes_and_required_texts() -> None:
    tree = module_tree()
    classes = module_classes()
    assert {"RubikSSL", "RubikSSLWidget", "RubikSSLLogic", "RubikSSLTest", "RubikSSLParameterNode"} <= classes.keys()
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"RubikSSLWidget", "RubikSSLLogic"} <= imported  # Slicer looks them up by name in RubikSSL.py
    init = classes["RubikSSL"].body[0]
    assigned = {ast.unparse(s.targets[0]): s.value for s in ast.walk(init) if isinstance(s, ast.Assign)}
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        value = assigned[f"self.parent.{attribute}"]
        assert ast.unparse(value).strip("[]()'\" _") != "", attribute
    assert "Segmentation" in ast.unparse(assigned["self.parent.categories"])


def test_import_hygiene() -> None:
    heavy = {"torch", "monai", "slicerio", "safetensors", "filelock"}
    for path in MODULE_FILES:  # module level only: Slicer imports these at startup
        for node in module_tree(path).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not {n.split(".")[0] for n in names if n} & (heavy | {"SimpleITK"}), f"{path.name}: {ast.unparse(node)}"
    for path in (REPO / "RubikSSLLib").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not {n.split(".")[0] for n in names} & {"slicer", "qt", "ctk", "vtk"}, f"{path.name}: {ast.unparse(node)}"
    # what the module imports from the library at startup pulls in nothing heavy
    probe = ("import sys; import RubikSSLLib.jobs, RubikSSLLib.slicergeometry, RubikSSLLib.clicksession, RubikSSLLib.taskspec; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(heavy | {'SimpleITK'})!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert loaded.strip() == "[]"


def cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "RubikSSL") for line in body.splitlines() if line.strip()]


def files_under(folder: Path, skip: set[str]) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not (set(p.relative_to(folder).parts) & skip)
            and p.name != "CMakeLists.txt"}


def path_fields() -> dict[str, str]:
    tree = module_tree(PARTS / "parameters.py")
    assignment = next(n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "PATH_FIELDS")
    return ast.literal_eval(assignment.value)


def test_cmake_lists_match_the_files_on_disk() -> None:
    module_cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = set(cmake_list(module_cmake, "MODULE_PYTHON_SCRIPTS") + cmake_list(module_cmake, "MODULE_PYTHON_RESOURCES"))
    assert listed == files_under(MODULE, skip={"Testing"})
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    lib_cmake = (REPO / "RubikSSLLib" / "CMakeLists.txt").read_text()
    listed = set(cmake_list(lib_cmake, "LIB_PYTHON_SCRIPTS") + cmake_list(lib_cmake, "LIB_PYTHON_RESOURCES"))
    assert listed == files_under(REPO / "RubikSSLLib", skip=set())
    assert "WITH_SUBDIR" in lib_cmake and "WITH_GENERIC_TESTS" not in lib_cmake


def test_extension_metadata_and_catalog_entry() -> None:
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(RubikSSL\)", top, re.M)
    metadata = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', top))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert metadata.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is not set"
    assert metadata["EXTENSION_CATEGORY"] == "Segmentation"
    assert metadata["EXTENSION_ICONURL"].endswith("/RubikSSL.png") and (REPO / "RubikSSL.png").exists()
    for line in ("add_subdirectory(RubikSSL)", "add_subdirectory(RubikSSLLib)", "find_package(Slicer REQUIRED)"):
        assert line in top
    assert (REPO / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    # slicer-extension-catalog-entry-schema-v1.0.1: required $schema, category, scm_url; no other keys than its
    # properties; scm_type in {git, local}; tier an integer 1..5; build_dependencies a list of strings.
    entry = json.loads((REPO / "RubikSSL.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= entry.keys() <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry.get("scm_type", "git") in ("git", "local")
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert entry["category"] == metadata["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == metadata["EXTENSION_DEPENDS"].split()


def test_requirements_parse_and_leave_slicers_own_packages_alone() -> None:
    lines = [line.strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    names = {r.name.lower() for r in requirements}
    assert {"monai", "slicerio", "safetensors", "filelock"} <= names
    assert not names & {"torch", "simpleitk", "numpy", "requests"}
    assert all("==" not in str(r.specifier) for r in requirements)


def test_one_dependency_list_for_pip_and_for_the_panel(slicer_module) -> None:
    """pyproject's dependencies = torch, numpy, SimpleITK, then exactly the panel's requirements.txt; the panel's
    torch floor and its package list follow them."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(line) for line in project["dependencies"]]
    assert [r.name for r in declared[:3]] == ["torch", "numpy", "SimpleITK"]
    lines = (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
    panel = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert [str(r) for r in declared[3:]] == [str(r) for r in panel]
    logic = slicer_module.RubikSSLLogic
    assert logic.TORCH_REQUIREMENT == str(declared[0].specifier)
    assert list(logic.PACKAGES) == ["torch"] + [r.name for r in panel]


# --- the module imported against stand-ins for Slicer, to run its logic's command building ---

class _Anything(types.ModuleType):
    """A stand-in module: any attribute is a class that accepts anything."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


@pytest.fixture()
def slicer_module(monkeypatch: pytest.MonkeyPatch):
    for name in ("qt", "vtk", "slicer", "slicer.i18n", "slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule",
                 "slicer.util"):
        monkeypatch.setitem(sys.modules, name, _Anything(name))
    sys.modules["slicer.i18n"].tr = lambda text: text
    sys.modules["slicer.i18n"].translate = lambda context, text: text
    wrapper = sys.modules["slicer.parameterNodeWrapper"]
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleLogic = type(
        "ScriptedLoadableModuleLogic", (), {"__init__": lambda self, *a, **k: None})
    monkeypatch.syspath_prepend(str(MODULE))
    forget_module()
    import RubikSSL

    yield RubikSSL
    forget_module()


def forget_module() -> None:
    for name in [n for n in sys.modules if n == "RubikSSL" or n.startswith("RubikSSLModuleLib")]:
        sys.modules.pop(name)


def accepted_by_the_cli(command: str, options: dict) -> None:
    from RubikSSLLib.cli import build_parser
    from RubikSSLLib.jobs import command_line

    args = command_line("python", command, options)
    build_parser().parse_args(args[3:])  # argparse exits (SystemExit) on an unknown or malformed option


def test_every_command_the_logic_builds_is_accepted_by_the_cli(slicer_module, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from RubikSSLModuleLib import logic as logic_module, nodeio

    logic = slicer_module.RubikSSLLogic.__new__(slicer_module.RubikSSLLogic)
    started = []
    logic.start = lambda command, options, **kwargs: started.append((command, options))
    logic.workBase = lambda: tmp_path
    monkeypatch.setattr(nodeio, "write_volume", lambda node, path, rasBounds=None: path)
    assert logic_module.nodeio is nodeio
    params = types.SimpleNamespace(**{name: None for name in parameter_fields()})
    dicom_name = "3: T1 / axial"  # how Slicer names a DICOM series: not a legal file name on Windows
    params.__dict__.update(puzzleSeed=3, pretrainFolder=str(tmp_path), pretrainRun=str(tmp_path / "pre"), cubeSize=16,
                           numPermutations=50, steps=10, batchSize=2, device="cpu", finetuneTask="segment",
                           labelledData=str(tmp_path / "datalist.json"), fromScratch=False, decoder="duc", epochs=2,
                           labelFraction=0.5, finetuneRun=str(tmp_path / "ft"), modelRun=str(tmp_path / "ft"),
                           pretrainTask="mae", inputVolume=types.SimpleNamespace(GetName=lambda: dicom_name), roi=None)
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "config.json").write_text(json.dumps({"data": ["/the/first/start/volume_000.nrrd"]}))
    logic.startPretraining(params, volumes=[object()], resume=True)
    logic.startPretraining(params, volumes=[object(), object()])
    logic.startFinetuning(params, resume=False)
    logic.startPuzzle(params, solve=True)
    logic.startPuzzle(params, solve=False)
    (tmp_path / "ft").mkdir()
    for task in ("segment", "classify"):
        (tmp_path / "ft" / "model.json").write_text(json.dumps({"task": task}))
        logic.startInference(params)
    params.interactiveModel = str(tmp_path / "ft")
    params.acceptedFolder = str(tmp_path / "accepted")
    logic.startContinuedFinetuning(params)
    logic.startRanking(params, volumes=[object()])
    assert [c for c, _ in started] == ["pretrain", "pretrain", "finetune", "puzzle", "puzzle", "segment", "classify",
                                       "finetune", "rank"]
    assert started[7][1]["resume_from"] == str(tmp_path / "ft")
    assert started[4][1]["task"] == "mae" and started[0][1]["task"] == "mae"
    for command, options in started:
        accepted_by_the_cli(command, options)
        for value in options.values():  # fixed file names: the node's name is never part of a path
            assert dicom_name not in str(value) and ":" not in Path(str(value)).name
    resumed, fresh = started[0][1], started[1][1]
    assert resumed["data"] == ["/the/first/start/volume_000.nrrd"] and resumed["resume"] is True  # nothing rewritten
    assert fresh["data"] == [str(tmp_path), str(tmp_path / "pre" / "inputs" / "volume_000.nrrd"),
                             str(tmp_path / "pre" / "inputs" / "volume_001.nrrd")]  # the run owns its inputs
    assert started[5][1]["out"] == str(tmp_path / "inference" / "result.seg.nrrd") and started[5][1]["device"] == "cpu"
    assert slicer_module.RubikSSLParameterNode.pretrainRun == "" and not logic_module.isSet("") and logic_module.isSet(str(tmp_path))
    assert not logic_module.isSet(' " " ') and logic_module.isSet('"C:\\my runs\\a"')


def test_the_interactive_workers_command_is_accepted_by_the_cli(slicer_module) -> None:
    from RubikSSLModuleLib import interactivepanel

    args = interactivepanel.serveCommand("python", "/runs/click_model", "cuda")
    assert args[3:6] == ["serve", "--model", "/runs/click_model"]
    accepted_by_the_cli("serve", {"model": "/runs/click_model", "device": "cuda"})
    from RubikSSLLib.cli import build_parser

    build_parser().parse_args(args[3:])
