"""The locked install: ``make setup`` installs exactly requirements.lock (``make lock`` writes it
from pyproject's ranges), so the environment the tests run in is the locked one: every locked
package that applies to this platform is installed at its locked version and nothing else is."""

from __future__ import annotations

import importlib.metadata as md

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

NOT_LOCKED = {"ldm-lab", "pip", "uv", "setuptools", "wheel"}  # the project itself and the installer


def _locked() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        req, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, version = req.strip().partition("==")
        out[canonicalize_name(name)] = version.strip()
    return out


def test_the_environment_is_the_lock():
    locked = _locked()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    assert len(locked) > 50
    wrong = {k: (v, installed.get(k)) for k, v in locked.items() if installed.get(k) != v}
    extra = sorted(set(installed) - set(locked) - NOT_LOCKED)
    assert not wrong, f"installed versions differ from requirements.lock (run make setup): {wrong}"
    assert not extra, f"installed but not locked (run make lock): {extra}"


def test_the_lock_satisfies_the_declared_ranges():
    """Every dependency ldm-lab declares (its installed metadata: pyproject's ranges, the dev extra
    included) is locked at a version inside its range."""
    locked = _locked()
    declared = [Requirement(r) for r in md.requires("ldm-lab")]
    declared = [r for r in declared if r.marker is None or r.marker.evaluate({"extra": "dev"})]
    assert len(declared) > 15
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is declared but not locked: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} is outside {req.specifier}"
