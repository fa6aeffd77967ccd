"""The one place where tests stand in for what Slicer's own libraries (slicer-core, PyPI) lack.

slicer-core is Slicer's MRML and logic without Qt: the scene, every node and storage node, the Segmentations,
Volumes, Markups, Colors and Subject Hierarchy logics, and slicer.util's array and observer helpers. Everything
the module does to MRML runs on those, for real. What it lacks, and is stood in for here:

- `qt` and the panel's widgets: `FakeWidget`s built from the module's own .ui file (names, classes, texts,
  tooltips, checkable state), with `click()`, `type()` and `emit()` for tests; a `QTimer` that fires only when a
  test calls `fire()`; `QFileDialog` answers set by the test.
- `slicer.app` (application logic, temporary folder, processEvents), `slicer.modules` (the logics by module
  name), `slicer.i18n`, the scripted-module base classes, and the parameter node wrapper (typed fields stored on
  a real vtkMRMLScriptedModuleNode; GUI binding is Qt's and is not run).
- the dialogs of slicer.util (error, confirm, tryWithErrorDisplay): recorded in `StandIn.messages`.

Install with the `slicer_standin` fixture (conftest.py): a fresh scene per test, everything restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import sys
import types
import typing
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "RubikSSL" / "Resources" / "UI" / "RubikSSL.ui"
# slicer-core publishes wheels for these platforms only (PyPI, 5.11.0.6): elsewhere the lane is skipped, with the reason.
WHEEL_PLATFORMS = {("Linux", "x86_64"), ("Windows", "AMD64"), ("Darwin", "arm64")}


def import_slicer_core() -> types.ModuleType:
    """Slicer's own `slicer` package, or a visible skip where slicer-core has no wheel for this machine."""
    where = (platform.system(), platform.machine())
    if where not in WHEEL_PLATFORMS or not (3, 10) <= sys.version_info[:2] <= (3, 13):
        pytest.skip(f"slicer-core has no wheel for {where[0]} {where[1]} / Python {platform.python_version()}")
    try:
        import slicer
        from slicer import vtkMRMLScene  # noqa: F401 - the real package, not a stand-in left in sys.modules
    except ImportError as error:
        pytest.fail(f"slicer-core should be installed here (bash run.sh test installs it): {error}")
    return slicer


# ---------------------------------------------------------------------------------------------------- Qt widgets

class FakeWidget:
    """One named widget of the .ui: its properties as attributes, its signals as connected slots."""

    def __init__(self, name: str, cls: str, properties: dict[str, typing.Any]) -> None:
        self.objectName, self.className = name, cls
        self.text, self.toolTip, self.enabled, self.visible = "", "", True, True
        self.checked, self.checkable, self.value, self.minimum, self.maximum = False, False, 0, 0, 100
        self.currentPath, self.plainText = "", ""
        self._slots: dict[str, list[Callable]] = {}
        self._checked_nodes: list = []
        self._current_node = None
        self.placeModeEnabled, self.placeMultipleMarkups = False, 0
        self.items: list[str] = []
        self.currentRow = -1
        for key, value in properties.items():
            setattr(self, key, value)

    # signals
    def connect(self, signal: str, slot: Callable) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal: str, slot: Callable | None = None) -> None:
        self._slots[signal] = [s for s in self._slots.get(signal, []) if slot is not None and s is not slot]

    def emit(self, signal: str, *args: typing.Any) -> None:
        """Call the connected slots as PythonQt does: a slot that takes fewer arguments than the signal carries
        gets the first ones (Slicer's template connects clicked(bool) to `onApplyButton(self)`)."""
        for slot in list(self._slots.get(signal, [])):
            slot(*args[:_accepted_arguments(slot, len(args))])

    def click(self) -> None:
        """What a user's click does: nothing on a disabled button, else clicked(bool)."""
        assert self.visible, f"{self.objectName} is hidden"
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self.checked
        self.emit("clicked(bool)", self.checked)

    def type(self, text: str) -> None:
        """Type `text` into a path field one key at a time: ctkPathLineEdit emits currentPathChanged per keystroke."""
        for character in text:
            self.currentPath += character
            self.emit("currentPathChanged(QString)", self.currentPath)

    # QWidget, QProgressBar, QPlainTextEdit
    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setRange(self, low: int, high: int) -> None:
        self.minimum, self.maximum = low, high

    def appendPlainText(self, line: str) -> None:
        self.plainText += line + "\n"

    def clear(self) -> None:
        self.plainText, self.items, self.currentRow = "", [], -1

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene

    # QListWidget
    def addItem(self, text: str) -> None:
        self.items.append(text)

    def count(self) -> int:
        return len(self.items)

    # qMRMLNodeComboBox, qMRMLCheckableNodeComboBox, qSlicerMarkupsPlaceWidget
    def checkedNodes(self) -> list:
        return list(self._checked_nodes)

    def setCheckedNodes(self, nodes: list) -> None:
        self._checked_nodes = list(nodes)
        self.emit("checkedNodesChanged()")

    def setCurrentNode(self, node) -> None:
        self._current_node = node

    def currentNode(self):
        return self._current_node

    def setPlaceModeEnabled(self, enabled: bool) -> None:
        self.placeModeEnabled = bool(enabled)


def _accepted_arguments(slot: Callable, available: int) -> int:
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


def _property_value(element: ET.Element) -> typing.Any:
    child = next(iter(element))
    if child.tag == "bool":
        return child.text == "true"
    if child.tag in ("number", "double"):
        return float(child.text) if child.tag == "double" else int(child.text)
    return child.text or ""


def widgets_from_ui(path: Path = UI_FILE) -> dict[str, FakeWidget]:
    """Every named widget of the .ui file as a FakeWidget with the .ui's own standard properties."""
    widgets = {}
    for element in ET.parse(path).getroot().iter("widget"):
        properties = {}
        for prop in element.findall("property"):
            if prop.get("stdset") == "0":
                continue
            name = prop.get("name")
            if name in ("text", "toolTip", "checkable", "checked", "enabled", "minimum", "maximum", "value"):
                properties[name] = _property_value(prop)
        widgets[element.get("name")] = FakeWidget(element.get("name"), element.get("class"), properties)
    return widgets


class QTimer:
    """Fires its slots only when a test calls `fire()` (Qt's event loop does not run here)."""

    created: list[QTimer] = []

    def __init__(self) -> None:
        self.interval, self.active, self._slots = 0, False, []
        QTimer.created.append(self)

    def setInterval(self, milliseconds: int) -> None:
        self.interval = milliseconds

    def connect(self, signal: str, slot: Callable) -> None:
        self._slots.append(slot)

    def start(self, milliseconds: int | None = None) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        if self.active:
            for slot in list(self._slots):
                slot()

    @staticmethod
    def singleShot(milliseconds: int, slot: Callable) -> None:
        slot()


class QFileDialog:
    answer = ""

    @staticmethod
    def getExistingDirectory(parent, caption: str = "", directory: str = "") -> str:
        return QFileDialog.answer


# ------------------------------------------------------------------------ the parameter node wrapper (pure Python)

def WithinRange(low, high):  # noqa: N802 - Slicer's name
    return ("range", low, high)


def Choice(choices):  # noqa: N802 - Slicer's name
    return ("choice", tuple(choices))


def parameterNodeWrapper(cls: type) -> type:  # noqa: N802 - Slicer's name
    """Typed fields with defaults, stored on a real vtkMRMLScriptedModuleNode as Slicer's wrapper stores them
    (strings for values, node references for nodes); setting a field modifies the node."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        fields[name] = (base, getattr(cls, name, None))

    def make_property(name: str, base: type) -> property:
        is_node = isinstance(base, type) and base.__name__.startswith("vtkMRML")

        def get(self):
            if is_node:
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return {bool: lambda t: t == "True", int: int, float: float}.get(base, str)(text)

        def set_(self, value) -> None:
            if is_node:
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, str(value))

        return property(get, set_)

    def init(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for name, (base, default) in fields.items():
            is_node = isinstance(base, type) and base.__name__.startswith("vtkMRML")
            if not is_node and not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, str(default if default is not None else base()))

    namespace = {name: make_property(name, base) for name, (base, _) in fields.items()}
    namespace.update(
        __init__=init, allParameters=dict(fields),
        connectGui=lambda self, gui: object(), disconnectGui=lambda self, tag: None,
        AddObserver=lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority),
        RemoveObserver=lambda self, tag: self.parameterNode.RemoveObserver(tag),
        Modified=lambda self: self.parameterNode.Modified())
    return type(cls.__name__, (), namespace)


# ------------------------------------------------------------------------------------- slicer.app and the rest

class Application:
    """slicer.app: the real application logic, a temporary folder, and an event loop that does nothing."""

    def __init__(self, slicer: types.ModuleType, scene, temporary: Path) -> None:
        self.logic = slicer.vtkSlicerApplicationLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.GetColorLogic().SetMRMLScene(scene)
        self.logic.GetColorLogic().AddDefaultColorNodes()
        self.temporaryPath = str(temporary)

    def applicationLogic(self):
        return self.logic

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return True

    def layoutManager(self):
        return None


class Module:
    """slicer.modules.<name>: a module with its logic."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


class StandIn:
    """The installed stand-ins of one test: the real scene, the fake widgets and what the dialogs were asked."""

    def __init__(self, slicer: types.ModuleType, temporary: Path) -> None:
        self.slicer, self.temporary = slicer, temporary
        self.scene = slicer.vtkMRMLScene()
        self.app = Application(slicer, self.scene, temporary)
        self.logics = {}
        for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()),
                            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                            ("Markups", slicer.vtkSlicerMarkupsLogic()),
                            ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())):
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app.logic)
            self.app.logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.app.logic.SetModuleLogic("Colors", self.app.logic.GetColorLogic())
        self.messages: list[tuple[str, str]] = []
        self.confirm = True  # what the user answers to a confirmation dialog
        self.widgets = widgets_from_ui()

    def ui(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(**self.widgets)

    # slicer.util's dialogs
    def record(self, kind: str) -> Callable:
        def show(text: str = "", *args, **kwargs):
            self.messages.append((kind, str(text)))
            return self.confirm if kind == "confirm" else None
        return show

    @contextlib.contextmanager
    def try_with_error_display(self, message: str = "", waitCursor: bool = False, **kwargs) -> Iterator[None]:
        """Slicer's tryWithErrorDisplay: an exception becomes an error dialog (message and the error's text)."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - what Slicer's helper does
            self.messages.append(("error", f"{message} {error}".strip()))

    def close(self) -> None:
        """After a test: nothing observes the scene any more (a widget's observers must not run while Python
        tears the widget down), and the scene is emptied."""
        self.scene.RemoveAllObservers()
        self.scene.Clear()

    def node_classes(self) -> list[str]:
        return [self.scene.GetNthNode(i).GetClassName() for i in range(self.scene.GetNumberOfNodes())]

    def count(self, class_name: str) -> int:
        return self.scene.GetNumberOfNodesByClass(class_name)


def modules(**logics) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name.lower(): Module(logic) for name, logic in logics.items()})


def install(monkeypatch: pytest.MonkeyPatch, temporary: Path) -> StandIn:
    """Install the stand-ins over the real slicer package for one test (monkeypatch restores everything)."""
    slicer = import_slicer_core()
    standin = StandIn(slicer, temporary)
    monkeypatch.setattr(slicer, "mrmlScene", standin.scene, raising=False)
    monkeypatch.setattr(slicer, "app", standin.app, raising=False)
    monkeypatch.setattr(slicer, "modules", modules(**standin.logics), raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget",
                        types.SimpleNamespace(ForcePlaceMultipleMarkups=2), raising=False)

    qt = types.ModuleType("qt")
    qt.QTimer, qt.QFileDialog = QTimer, QFileDialog
    QTimer.created = []
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.WithinRange, wrapper.Choice = parameterNodeWrapper, WithinRange, Choice
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    for name, module in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapper),
                         ("slicer.ScriptedLoadableModule", scripted)):
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".", 1)[1], module, raising=False)

    util = slicer.util
    for name, kind in (("errorDisplay", "error"), ("warningDisplay", "warning"), ("infoDisplay", "info"),
                       ("confirmOkCancelDisplay", "confirm"), ("confirmYesNoDisplay", "confirm"),
                       ("showStatusMessage", "status"), ("delayDisplay", "info")):
        monkeypatch.setattr(util, name, standin.record(kind))
    monkeypatch.setattr(util, "tryWithErrorDisplay", standin.try_with_error_display)
    monkeypatch.setattr(util, "mainWindow", lambda: None)
    monkeypatch.setattr(util, "loadUI", lambda path: FakeWidget("RubikSSL", "qMRMLWidget", {}))
    monkeypatch.setattr(util, "childWidgetVariables", lambda widget: standin.ui())
    monkeypatch.setattr(util, "startupEnvironment", lambda: dict(os.environ))

    def temp_directory(key: str = "__SlicerTemp__", tempDir=None, includeDateTime: bool = True) -> str:
        folder = Path(tempDir or temporary) / key
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    monkeypatch.setattr(util, "tempDirectory", temp_directory)
    return standin


# --------------------------------------------------------------------------- the scripted-module base classes

class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class _Layout:
    def __init__(self) -> None:
        self.widgets = []

    def addWidget(self, widget) -> None:
        self.widgets.append(widget)


class ScriptedLoadableModuleWidget:
    """What Slicer's base gives a module widget: its parent (entered or not), a layout and resourcePath."""

    def __init__(self, parent=None) -> None:
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.layout = _Layout()
        self.developerMode = True
        self.moduleName = "RubikSSL"

    def resourcePath(self, filename: str) -> str:
        return str(REPO / "RubikSSL" / "Resources" / filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def onReload(self) -> None:
        """Slicer's reload: cleanup() of this widget, then a new one (RubikSSL.py re-executed)."""
        self.cleanup()


class ScriptedLoadableModuleLogic:
    """getParameterNode() as Slicer's: the scene's singleton vtkMRMLScriptedModuleNode of the module."""

    def __init__(self, parent=None) -> None:
        self.moduleName = "RubikSSL"

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node
