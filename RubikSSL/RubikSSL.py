"""RubikSSL: self-supervised pretraining, fine-tuning and inference of 3D CNNs from inside 3D Slicer.

Thin by design: this file declares the module and its self-test; the panel's parts (RubikSSLModuleLib) each own
one concern: the settings (parameters), the panel drawing (widget), the actions (logic), the job state machine
(jobcontrol, plain Python), scene nodes -> files (nodeio), files -> scene nodes (results), dependencies (install)
and click-guided segmentation (interactivepanel). Every long job is the RubikSSLLib command line in a separate
process (`RubikSSLLib.jobs`), read through its JSON progress lines. torch and MONAI are never imported by this
module; PyTorch Utils does import torch into Slicer when it installs it.
"""

import sys
import unittest
from pathlib import Path

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

# From the source tree RubikSSLLib sits beside this module's folder; installed, it sits beside this file. The
# module's own package (RubikSSLModuleLib) sits beside this file in both.
_SOURCE_TREE = Path(__file__).resolve().parent.parent
if (_SOURCE_TREE / "RubikSSLLib").is_dir() and str(_SOURCE_TREE) not in sys.path:
    sys.path.insert(0, str(_SOURCE_TREE))
_MODULE_FOLDER = str(Path(__file__).resolve().parent)
if _MODULE_FOLDER not in sys.path:
    sys.path.insert(0, _MODULE_FOLDER)

# Light parts only (stdlib and numpy): SimpleITK and the rest load when a job first needs them.
from RubikSSLModuleLib import jobcontrol, nodeio  # noqa: E402
from RubikSSLModuleLib.logic import RubikSSLLogic  # noqa: E402, F401 - Slicer finds <Module>Logic here by name
from RubikSSLModuleLib.parameters import RubikSSLParameterNode  # noqa: E402, F401
from RubikSSLModuleLib.widget import RubikSSLWidget  # noqa: E402, F401 - Slicer finds <Module>Widget here by name


class RubikSSL(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RubikSSL")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["RubikSSL developers"]
        self.parent.helpText = _(
            "Teach a 3D network from your own unlabeled volumes by solving Rubik's cube puzzles, fine-tune it on the "
            "few cases you labelled, and run it: results load as named, coloured segments or class probabilities; "
            "an interactive model segments from include / exclude points. "
            'See the <a href="https://github.com/rubikssl/SlicerRubikSSL#3d-slicer">README</a>.')
        self.parent.acknowledgementText = _(
            "Rubik's cube recovery: Zhuang et al., MICCAI 2019. Built on PyTorch, MONAI, SimpleITK and slicerio.")


class RubikSSLTest(ScriptedLoadableModuleTest):
    """Inside Slicer (`--testing`): a small synthetic volume through scramble, a few pretraining steps, cancel, and
    the panel's return to idle. The worker test needs the dependencies (not installed in testing mode): without
    them it is reported as skipped, not passed. Every wait has a deadline."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_geometry_round_trip, self.test_scramble_pretrain_cancel_and_load):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as skipped:
                self.delayDisplay(f"SKIPPED {test.__name__}: {skipped}")

    def syntheticVolume(self):
        import numpy as np

        rng = np.random.default_rng(0)
        array = rng.normal(100, 20, (64, 96, 96)).astype(np.float32)  # K, J, I; 96 x 96 x 128 mm
        array[10:50, 20:70, 25:80] += 200
        ijkToRAS = np.diag([-1.0, -1.0, 2.0, 1.0])
        ijkToRAS[:3, 3] = (30.0, 20.0, -10.0)
        return slicer.util.addVolumeFromArray(array, ijkToRAS, name="synthetic")

    def waitFor(self, logic, until=lambda control: control.state == jobcontrol.IDLE, timeoutSeconds=600):
        import time

        deadline = time.monotonic() + timeoutSeconds
        while not until(logic.control):
            logic.control.poll()
            slicer.app.processEvents()
            self.assertLess(time.monotonic(), deadline, "the worker did not get there in time")
            time.sleep(0.1)
        return logic.control.status

    def test_geometry_round_trip(self):
        import numpy as np

        import SimpleITK as sitk

        volume = self.syntheticVolume()
        logic = RubikSSLLogic()
        path = nodeio.write_volume(volume, nodeio.work_folder(logic.workBase(), "selftest") / "synthetic.nrrd")
        image = sitk.ReadImage(str(path))
        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        lps = image.TransformIndexToPhysicalPoint((5, 6, 7))
        ras = np.array(ijkToRAS.MultiplyPoint((5, 6, 7, 1)))[:3]
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))

    def test_scramble_pretrain_cancel_and_load(self):
        logic = RubikSSLLogic()
        if logic.missingPackages():
            self.skipTest(f"install the dependencies first (missing: {', '.join(logic.missingPackages())})")
        p = logic.getParameterNode()
        p.inputVolume = self.syntheticVolume()
        p.cubeSize, p.steps, p.batchSize, p.device = 16, 100000, 2, "cpu"
        p.pretrainRun = str(nodeio.work_folder(logic.workBase(), "selftest") / "run")

        logic.startPuzzle(p, solve=False)
        self.waitFor(logic)
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName("synthetic scrambled"))

        logic.startPretraining(p, [p.inputVolume])
        self.waitFor(logic, until=lambda control: control.job.state.step >= 2 or not control.job.running)
        logic.control.cancel()
        self.waitFor(logic)
        self.assertEqual(logic.control.job.state.status, "cancelled")
        self.assertTrue((Path(p.pretrainRun) / "checkpoint.safetensors").exists())
        self.assertEqual(logic.control.view().progress, None)
        self.delayDisplay("Scramble, pretraining, cancel: passed")
