"""The container image, built and used: deploy/build-image.sh builds deploy/Containerfile with
podman (on the official Python image, or where no registry is reachable on a Debian base made
with debootstrap), and the whole pipeline runs inside it: ``stemstream demo`` (a local cluster
of two worker processes, the emulator with two sources, CURVE, the file and the stages) as the
image's non-root user. The scan file it writes is checked against the emulator's ground truth,
regenerated here through the emulator's Python API.

The build steps and the run use chroot isolation (``buildah run --isolation chroot``): this
machine, like many CI runners, allows no nested containers (no cgroups or rlimits to set), and
chroot isolation needs neither. Slow (3-6 minutes): ``pytest -m slow tests/test_deploy_image.py``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_cli import csr_sorted, emulator_events

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCAN, DETECTOR, DOSE, SOURCES = (24, 32), (64, 64), 30.0, 2


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/system-packages.txt; make test installs them)")


@pytest.fixture(scope="module")
def image():
    need("podman", "buildah", "debootstrap")
    r = subprocess.run(["bash", str(ROOT / "deploy/build-image.sh"), "stemstream:test"], capture_output=True,
                       text=True, timeout=1500, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == "stemstream:test"
    yield "localhost/stemstream:test"
    subprocess.run(["podman", "rmi", "-f", "localhost/stemstream:test"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def container(image):
    ctr = subprocess.run(["buildah", "from", "--pull-never", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    yield ctr
    subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)


def run_in(container: str, *command: str, volumes=(), timeout=900) -> subprocess.CompletedProcess:
    args = ["buildah", "run", "--isolation", "chroot", "--user", "1000"]
    for v in volumes:
        args += ["-v", v]
    return subprocess.run([*args, container, "--", *command], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_image_runs_the_command_as_its_user(container):
    r = run_in(container, "sh", "-c", "id -u; command -v stemstream; stemstream --help")
    assert r.returncode == 0, r.stderr
    uid, where, *help_text = r.stdout.splitlines()
    assert uid == "1000" and where == "/opt/venv/bin/stemstream"
    assert any("Real-time processing of electron-counted 4D-STEM data" in line for line in help_text)


def test_demo_in_the_image_writes_the_emulators_events(container, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 1000) writes there
    r = run_in(container, "sh", "-c",
               "cd /home/stemstream && stemstream demo --out /data --scan {}x{} --detector {}x{} --dose {} "
               "--sources {} --counting-dose 0".format(*SCAN, *DETECTOR, DOSE, SOURCES),
               volumes=[f"{out}:/data"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "complete" in r.stdout and "Traceback" not in r.stderr, r.stdout[-3000:]
    counts, indices, _ = emulator_events("mgo", 0, SCAN, DETECTOR, DOSE)  # the demo's seed is 0
    want_off, want_idx = csr_sorted(counts, indices)
    with h5py.File(out / "demo-0000.h5", "r") as f:
        assert f.attrs["status"] == "complete", f.attrs["reason"]
        np.testing.assert_array_equal(f["events/offsets"][()], want_off)
        np.testing.assert_array_equal(f["events/indices"][()], want_idx)
        # the summed pattern the workers built, against numpy over the true events
        np.testing.assert_array_equal(f["results/diffraction_sum"][()].ravel(),
                                      np.bincount(indices, minlength=DETECTOR[0] * DETECTOR[1]))
