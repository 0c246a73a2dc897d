"""The container files in docker/, read without building anything (docker/README.md records a real build).

Each test pins one property a careless edit could break: the pinned install, the CPU/CUDA split, what
the build context leaves out, the compose wiring (one DICOMweb datastore for the server and its OHIF,
ports on the host's loopback only, no secrets in the files) and that every command line is one
``lmk3d serve`` accepts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from lmk3d.errors import LandmarkError
from lmk3d.serve import Safety, add_serve
from tests.conftest import ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)


# --- reading the files ----------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def runs(path: Path) -> str:
    return "\n".join(args for keyword, args in instructions(path) if keyword == "RUN")


def exec_form(path: Path, keyword: str) -> list[str]:
    (args,) = [a for k, a in instructions(path) if k == keyword]
    value = json.loads(args)
    assert isinstance(value, list), f"{path.name}: {keyword} must be in exec form (a JSON list)"
    return [str(v) for v in value]


def serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` as ``lmk3d serve`` does; an unknown or misspelt option fails the test."""
    parser = argparse.ArgumentParser(prog="lmk3d serve", exit_on_error=False)
    add_serve(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise AssertionError(f"lmk3d serve does not accept {argv}: {e}") from None


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (the forms these files use)."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        got = env.get(name)
        if op in (":?", "?") and not got:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and not got:
            return str(arg)
        return got or ""

    return _INTERPOLATION.sub(one, value)


def compose(*names: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose files merged the way ``docker compose -f A -f B`` merges these (maps deep, lists replaced)."""
    def merge(a: Any, b: Any) -> Any:
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a[k], v) if k in a else v for k, v in b.items()}}
        return b

    doc: dict[str, Any] = {}
    for name in names:
        loaded = yaml.safe_load((DOCKER / name).read_text(encoding="utf-8"))
        assert isinstance(loaded, dict), f"{name} is not a YAML mapping"
        doc = merge(doc, loaded)
    return doc if env is None else dict(interpolate(doc, env))


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / "env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"env.example: {line!r} is not NAME=VALUE"
            pairs[key.strip()] = value.strip()
    return pairs


def filled_env() -> dict[str, str]:
    """env.example with a made-up value for every empty variable (what a user's docker/.env holds)."""
    return {k: v or f"test-{k.lower()}" for k, v in env_example().items()}


def excluded(path: str, ignore_file: Path) -> bool:
    """Whether the build context leaves ``path`` out (.dockerignore rules: last match wins, a
    pattern that matches a folder matches everything under it, ``**`` spans folders)."""
    patterns = []
    for line in ignore_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rx = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((negate, re.compile(rx)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, compiled in patterns:
        if any(compiled.fullmatch(p) for p in prefixes):
            result = not negate
    return result


# --- Dockerfiles ----------------------------------------------------------------------------------
def test_constraints_pin_the_torch_the_dockerfiles_install() -> None:
    (pin,) = re.findall(r"^torch==(\S+)$", (ROOT / "requirements/constraints.txt").read_text(), re.MULTILINE)
    cpu, cuda = runs(DOCKERFILES["cpu"]), runs(DOCKERFILES["cuda"])
    assert f'"torch=={pin}+cpu"' in cpu, "the CPU image must install the constraints' torch, CPU build"
    assert f'"torch=={pin}"' in cuda, "the CUDA image must install the constraints' torch (PyPI's CUDA build)"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_every_pip_install_goes_through_the_constraints(variant: str) -> None:
    commands = re.findall(r"pip install[^&]*", runs(DOCKERFILES[variant]))
    assert len(commands) >= 2, "torch first, then the project: two installs expected"
    for command in commands:
        assert "-c requirements/constraints.txt" in command, f"unconstrained install: {command.strip()}"
    assert any('-e ".[app]"' in c for c in commands), "the image must install the project with its app extra"


def test_cpu_image_removes_torchvision_and_the_cuda_image_keeps_it() -> None:
    cpu, cuda = runs(DOCKERFILES["cpu"]), runs(DOCKERFILES["cuda"])
    assert "pip uninstall -y torchvision" in cpu
    assert "torchvision is installed next to a CPU-only torch" in cpu, "the CPU build must check it is gone"
    assert "torch.version.cuda" in cpu, "the CPU build must refuse a CUDA torch"
    assert "uninstall" not in cuda, "monailabel needs torchvision (through sam2); a CUDA torch loads it"
    assert "not torch.version.cuda" in cuda and "find_spec('torchvision')" in cuda


def test_only_the_cpu_image_reads_local_wheels() -> None:
    assert "--find-links /tmp/wheels" in runs(DOCKERFILES["cpu"])
    # pip prefers 2.13.0+cpu to 2.13.0: a CPU wheel in docker/wheels would replace PyPI's CUDA build.
    assert "/tmp/wheels" not in runs(DOCKERFILES["cuda"])
    assert not excluded("docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                        DOCKER / "Dockerfile.dockerignore")
    assert excluded("docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                    DOCKER / "Dockerfile.cuda.dockerignore")


def test_both_images_share_the_layout_after_the_install() -> None:
    def tail(path: Path) -> list[tuple[str, str]]:
        steps = instructions(path)
        first = steps.index(("COPY", "apps apps"))
        return steps[first:]

    assert tail(DOCKERFILES["cpu"]) == tail(DOCKERFILES["cuda"])


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_runs_lmk3d_serve_as_a_user_on_the_exposed_port(variant: str) -> None:
    path = DOCKERFILES[variant]
    steps = instructions(path)
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    assert exec_form(path, "ENTRYPOINT") == ["lmk3d", "serve"]
    args = serve_args(exec_form(path, "CMD"))
    assert (args.studies, args.workspace, args.host) == ("/studies", "/workspace", "0.0.0.0")
    volumes = json.loads(next(a for k, a in steps if k == "VOLUME"))
    assert {args.studies, args.workspace} <= set(volumes)
    assert [a for k, a in steps if k == "EXPOSE"] == [str(args.port)]
    (health,) = [a for k, a in steps if k == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{args.port}/info/" in health
    # Tokens come from the environment at run time, never from the image.
    assert not [a for k, a in steps if k in ("ENV", "ARG") and SECRET_NAME.search(a)]


# --- the build context ----------------------------------------------------------------------------
@pytest.mark.parametrize("ignore", ["Dockerfile.dockerignore", "Dockerfile.cuda.dockerignore"])
def test_build_context_keeps_local_state_out(ignore: str) -> None:
    path = DOCKER / ignore
    for inside in ("pyproject.toml", "README.md", "requirements/constraints.txt", "src/lmk3d/serve.py",
                   "apps/landmarks/main.py", "models/cascade-hippocampus/checkpoint.pt"):
        assert not excluded(inside, path), f"{ignore} leaves out {inside}, which the image needs"
    for outside in (".venv/bin/python", ".demo/studies/case.nii.gz", "runs/pin/checkpoint.pt", ".git/HEAD",
                    "docker/.env", "tests/test_cli.py", "src/lmk3d/__pycache__/cli.cpython-311.pyc",
                    "src/lmk3d.egg-info/PKG-INFO", "apps/landmarks/logs/app.log", "apps/landmarks/model/x.pt",
                    "models/pin-hippocampus/checkpoint.previous.pt", "models/pin-hippocampus/.staging-1/x"):
        assert excluded(outside, path), f"{ignore} lets {outside} into the build context"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_every_copied_path_is_in_the_build_context(variant: str) -> None:
    ignore = DOCKER / f"{DOCKERFILES[variant].name}.dockerignore"
    for keyword, args in instructions(DOCKERFILES[variant]):
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not excluded(source, ignore), f"COPY {source}: left out by {ignore.name}"


# --- compose --------------------------------------------------------------------------------------
COMPOSE_SETS = [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")]


def server_command(doc: Mapping[str, Any]) -> argparse.Namespace:
    return serve_args([str(a) for a in doc["services"]["lmk3d"]["command"]])


@pytest.mark.parametrize("files", COMPOSE_SETS)
def test_compose_publishes_ports_on_the_host_loopback_only(files: tuple[str, ...]) -> None:
    doc = compose(*files, env=filled_env())
    published = 0
    for name, service in doc["services"].items():
        assert service.get("network_mode") != "host", f"{name}: host networking bypasses the port rules"
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                host_ip = str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published beyond the host's loopback"
            published += 1
    assert published >= 2, "the gateway (viewer and API) and Orthanc (uploads) must be reachable from the host"
    assert "ports" not in doc["services"]["lmk3d"], "lmk3d is reached through the gateway only"


def test_server_and_viewer_read_the_same_dicomweb_datastore() -> None:
    doc = compose("compose.yaml", env=filled_env())
    services = doc["services"]
    url = urlsplit(server_command(doc).studies)
    orthanc = json.loads((DOCKER / "orthanc.json").read_text(encoding="utf-8"))
    # The server's --studies URL is the orthanc service's DICOMweb root...
    assert url.scheme == "http" and url.hostname in services and "orthanc" in services[url.hostname]["image"]
    assert url.port == orthanc["HttpPort"]
    assert url.path.strip("/") == orthanc["DicomWeb"]["Root"].strip("/")
    assert orthanc["DicomWeb"]["Enable"] is True
    # ...and the browser reaches OHIF and its /proxy/dicom/ routes only through the gateway, which
    # forwards everything to that server.
    template = (DOCKER / "gateway" / "default.conf.template").read_text(encoding="utf-8")
    (target,) = re.findall(r"proxy_pass\s+http://([^;/]+);", template)
    assert target == f"lmk3d:{server_command(doc).port}"
    mount = "./gateway/default.conf.template:/etc/nginx/templates/default.conf.template:ro"
    assert mount in services["gateway"]["volumes"]


def test_bundled_ohif_reads_dicomweb_through_the_server_proxy() -> None:
    import importlib.util

    spec = importlib.util.find_spec("monailabel")
    if spec is None or spec.origin is None:
        pytest.skip("monailabel is not installed (the app extra)")
    config = (Path(spec.origin).parent / "endpoints" / "static" / "ohif" / "app-config.js").read_text()
    roots = dict(re.findall(r"(qidoRoot|wadoRoot|wadoUriRoot):\s*'([^']*)'", config))
    assert set(roots) == {"qidoRoot", "wadoRoot", "wadoUriRoot"}
    assert all(root.startswith("/proxy/dicom/") for root in roots.values()), roots


@pytest.mark.parametrize("files", COMPOSE_SETS)
def test_compose_requires_every_secret_and_holds_none(files: tuple[str, ...]) -> None:
    raw = compose(*files)
    secrets = [k for k in env_example() if SECRET_NAME.search(k)]
    assert secrets, "env.example lists no passwords or tokens"
    for name in secrets:
        assert env_example()[name] == "", f"env.example must not ship a value for {name}"
        without = {k: v for k, v in filled_env().items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            compose(*files, env=without)
    for service_name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{" + re.escape(key) + r":\?[^}]+\}", str(value)), (
                    f"{service_name}: {key} must come from docker/.env (${{{key}:?...}}), not {value!r}")


def test_secrets_stay_out_of_the_repository() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/.env (passwords and tokens) is not ignored by git"
    orthanc = json.loads((DOCKER / "orthanc.json").read_text(encoding="utf-8"))
    assert orthanc["AuthenticationEnabled"] is True
    users = orthanc["RegisteredUsers"]
    assert list(users.items()) == [("${LMK3D_PACS_USER}", "${LMK3D_PACS_PASSWORD}")], (
        f"hard-coded PACS credentials in orthanc.json: {users}")
    template = (DOCKER / "gateway" / "default.conf.template").read_text(encoding="utf-8")
    assert re.search(r'"Bearer \$\{LMK3D_API_TOKEN\}"', template)


@pytest.mark.parametrize("files", COMPOSE_SETS)
def test_placeholders_are_filled_from_the_service_environment(files: tuple[str, ...]) -> None:
    """orthanc.json and the gateway template are filled in their containers: each variable they use
    must be set there (the gateway fills only LMK3D_* names, so nginx's own $variables stay)."""
    services = compose(*files, env=filled_env())["services"]
    used = {
        "orthanc": set(re.findall(r"\$\{(\w+)\}", (DOCKER / "orthanc.json").read_text())),
        "gateway": set(re.findall(r"\$\{(\w+)\}", (DOCKER / "gateway/default.conf.template").read_text())),
    }
    for service, names in used.items():
        assert names, f"{service}: no placeholders found"
        environment = services[service]["environment"]
        assert all(environment.get(n) for n in names), f"{service}: {names - set(environment)} not set"
    assert services["gateway"]["environment"]["NGINX_ENVSUBST_FILTER"] == "^LMK3D_"
    assert all(n.startswith("LMK3D_") for n in used["gateway"])


@pytest.mark.parametrize("files", COMPOSE_SETS)
def test_server_in_compose_starts_only_with_authentication(files: tuple[str, ...]) -> None:
    doc = compose(*files, env=filled_env())
    args = server_command(doc)
    assert args.host == "0.0.0.0" and not args.allow_unauthenticated_network
    env = doc["services"]["lmk3d"]["environment"]
    safety = Safety(tuple(args.cors_origin), allow_unauthenticated_network=args.allow_unauthenticated_network)
    safety.check(args.host, env)  # the server's own start-up check passes with docker/.env filled in
    with pytest.raises(LandmarkError, match="without authentication"):
        safety.check(args.host, {k: v for k, v in env.items() if k != "LMK3D_API_TOKEN"})
    assert env["LMK3D_PACS_USER"] and env["LMK3D_PACS_PASSWORD"], "the PACS credentials must reach the server"


def test_browser_origin_through_the_gateway_is_allowed() -> None:
    env = {**filled_env(), "LMK3D_PORT": "8123"}
    doc = compose("compose.yaml", env=env)
    origins = server_command(doc).cors_origin
    assert doc["services"]["gateway"]["ports"] == ["127.0.0.1:8123:8000"]
    assert {"http://127.0.0.1:8123", "http://localhost:8123"} <= set(origins)


def test_gateway_refuses_foreign_host_names() -> None:
    template = (DOCKER / "gateway" / "default.conf.template").read_text(encoding="utf-8")
    (pattern,) = re.findall(r'if \(\$host !~\* "([^"]+)"\)', template)
    allowed = re.compile(pattern, re.IGNORECASE)
    for host in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]"):
        assert allowed.search(host), host
    for host in ("evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "lmk3d", "0.0.0.0", ""):
        assert not allowed.search(host), host
    assert re.search(r'map \$http_authorization \$lmk3d_authorization \{\s*""\s+"Bearer', template), (
        "the gateway must add the token only to requests that carry no Authorization header")


def test_gpu_override_uses_the_cuda_image_and_reserves_gpus() -> None:
    lmk3d = compose("compose.yaml", "compose.gpu.yaml", env=filled_env())["services"]["lmk3d"]
    assert lmk3d["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cuda"}
    assert (DOCKER.parent / lmk3d["build"]["dockerfile"]).is_file()
    (device,) = lmk3d["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    cpu = compose("compose.yaml", env=filled_env())["services"]["lmk3d"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile" and "deploy" not in cpu


def test_readme_names_existing_files_and_the_podman_ignore_file() -> None:
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"-f (docker/[\w.-]+)", readme))
    assert {"docker/Dockerfile", "docker/Dockerfile.cuda", "docker/compose.yaml", "docker/compose.gpu.yaml"} <= named
    for path in named:
        assert (ROOT / path).is_file(), f"docker/README.md names {path}, which does not exist"
    # podman reads .dockerignore/.containerignore only; without the flag it sends .venv and all.
    for command in re.findall(r"podman build[^`]*?(?=\n\n|```)", readme, re.DOTALL):
        if "-f docker/Dockerfile " in command:
            assert "--ignorefile docker/Dockerfile.dockerignore" in command, command
