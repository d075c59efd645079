"The OpenMP wait policy set by `import sphinx_tools`, checked in fresh interpreters."

import os
import subprocess
import sys

import pytest

SHOW = "import os, sys; {imports}; torch.ones(4).sum(); print(os.environ.get('OMP_WAIT_POLICY'))"


def run(imports: str, **env) -> tuple[str, str]:
    "(stdout, the OpenMP runtime's spin count as it reports it at start-up, or '')"
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", SHOW.format(imports=imports)], capture_output=True,
                         text=True, check=True, env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    spin = [ln.split("=", 1)[1].strip(" '") for ln in res.stderr.splitlines()
            if ln.strip().startswith("GOMP_SPINCOUNT")]
    return res.stdout.strip(), spin[0] if spin else ""


def test_import_sets_the_passive_wait_policy_before_torch_loads():
    out, spin = run("import sphinx_tools; import torch")
    assert out == "PASSIVE"
    _, spin_torch_first = run("import torch; import sphinx_tools")
    if not spin_torch_first:
        pytest.skip("the OpenMP runtime does not report its settings (not GNU OpenMP)")
    assert spin == "0"  # waiting threads sleep at once
    assert spin_torch_first != "0"  # too late once torch has loaded the runtime: it spins


def test_an_explicit_user_setting_wins():
    out, spin = run("import sphinx_tools; import torch", OMP_WAIT_POLICY="ACTIVE")
    assert out == "ACTIVE"
    if spin:
        assert int(spin) > 0


def test_apply_reports_whether_the_policy_governs_this_process():
    code = ("import sys; import sphinx_tools.threads as t; r1 = t.apply(); import torch; "
            "print(r1, t.apply())")
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=base).stdout.split()
    assert out == ["True", "False"]  # once torch is loaded the setting only reaches children
