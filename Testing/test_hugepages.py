"""The command line's processes allocate large tensors on transparent huge pages (hugepages.py), unless the user
chose otherwise; the setting only takes before torch's first allocation, so it is never set after torch is in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def python(code: str, **environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | environment
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


SETTING = "import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


def test_the_command_line_asks_for_huge_pages_before_torch_is_imported() -> None:
    assert python("import RubikSSLLib.cli, sys; assert 'torch' not in sys.modules; " + SETTING) == "1"


def test_a_users_own_setting_is_kept_and_a_late_request_does_nothing() -> None:
    assert python("import RubikSSLLib.cli; " + SETTING, THP_MEM_ALLOC_ENABLE="0") == "0"
    late = "import torch; from RubikSSLLib import hugepages; print(hugepages.request()); " + SETTING
    assert python(late).splitlines() == ["False", "None"]


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(),
                    reason="this kernel offers no transparent huge pages")
def test_a_large_tensor_of_a_command_line_process_lies_on_huge_pages() -> None:
    code = ("import RubikSSLLib.cli, re, torch; x = torch.ones(64 * 2**20 // 4); "
            "print(sum(int(k) for k in re.findall(r'AnonHugePages:\\s+(\\d+) kB', open('/proc/self/smaps').read())))")
    assert int(python(code)) >= 32 * 1024  # kB: at least half of the 64 MiB tensor
