"""The production deployment files: docker/, .dockerignore, docker-compose.yml and the Helm chart helm/refinery/.

No Docker engine and no helm binary are needed. docker-compose.yml, Chart.yaml and values.yaml are parsed with
PyYAML, Dockerfiles line by line, and the chart's templates are rendered by a small interpreter of the Go-template
and Sprig subset they use (GoTemplate below), then parsed as YAML and checked as Kubernetes objects. Where a
`helm` binary is on PATH, `helm lint` and `helm template` run as well.
"""
import base64
import copy
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from decimal import Decimal
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHART = ROOT / "helm" / "refinery"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = {
    "api": ROOT / "docker" / "Dockerfile.api",
    "worker": ROOT / "docker" / "Dockerfile.worker",
    "worker-gpu": ROOT / "docker" / "Dockerfile.worker-gpu",
}
ENV_NAME = re.compile(r"\bREFINERY_[A-Z0-9_]+\b")


# --------------------------------------------------------------------------------------------------------------
# What the project says: settings, queue name, packages, console script.


def settings_fields() -> set[str]:
    from core.settings import Settings

    return set(Settings.model_fields)


def queue_name() -> str:
    # Read, not imported: importing core.broker builds a Celery app (and an embedded broker folder).
    text = (ROOT / "core" / "broker.py").read_text()
    match = re.search(r'^QUEUE\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert match, "core/broker.py no longer defines QUEUE"
    return match.group(1)


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def top_level_packages() -> list[str]:
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in includes})


def module_path(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"


def check_command(argv: list[str]) -> None:
    """A container command runs code that exists in this repository."""
    assert argv, "empty command"
    if argv[0] == "celery":
        assert "-A" in argv, argv
        app = argv[argv.index("-A") + 1]
        assert app == "workers.app", argv
        assert module_path(app).exists(), f"{app} (celery -A) does not exist: expected workers/app.py"
        assert "worker" in argv and "--pool=solo" in argv and "--concurrency=1" in argv, argv
        # The queues come from REFINERY_WORKER_CLASSES (workers/app.py); a -Q would override them.
        assert "-Q" not in argv and "--queues" not in argv, argv
    elif argv[0] == "refinery":
        target = pyproject()["project"]["scripts"]["refinery"]
        module = target.split(":")[0]
        assert module_path(module).exists(), f"console script refinery -> {target}: {module} does not exist"
        assert len(argv) > 1 and argv[1] in {"api", "migrate"}, argv
        cli = module_path(module).read_text()
        assert f'add_parser("{argv[1]}"' in cli, f"{module} has no `refinery {argv[1]}` subcommand"
        for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{option}"' in cli, f"`refinery {argv[1]}` has no {option} option"
        if argv[1] == "api":
            assert module_path("api.main").exists(), "`refinery api` serves api.main:app: api/main.py does not exist"
            assert "--host" in argv and "--port" in argv, argv
        else:
            assert (ROOT / "db" / "migrations" / "env.py").exists(), "`refinery migrate` needs db/migrations/env.py"
    else:
        raise AssertionError(f"unexpected command {argv}")


def test_refinery_variables_are_settings_fields():
    """Every REFINERY_* name in docker/, docker-compose.yml and the chart is a field of core.settings.Settings."""
    fields = settings_fields()
    files = [COMPOSE, *sorted((ROOT / "docker").iterdir()), *sorted(p for p in CHART.rglob("*") if p.is_file())]
    unknown = {}
    for path in files:
        for name in ENV_NAME.findall(path.read_text()):
            if name.removeprefix("REFINERY_").lower() not in fields:
                unknown.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not unknown, f"not fields of core.settings.Settings: {unknown}"


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line:
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context: the last pattern matching it or a parent wins."""
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!").strip().strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile(name):
    path = DOCKERFILES[name]
    instructions = dockerfile_instructions(path)
    args = {}
    stages = set()
    froms = []
    copied = set()
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest and not froms:
            key, _, value = rest.partition("=")
            args[key] = value
        elif keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), parts[0])
            froms.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
        elif keyword == "COPY":
            tokens = shlex.split(rest)
            if any(t.startswith("--from=") for t in tokens):
                continue
            sources = [t for t in tokens if not t.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY source {source} does not exist"
                assert not dockerignore_excludes(source), f"{path.name}: COPY {source} is excluded by .dockerignore"
                copied.add(source.rstrip("/").removeprefix("./"))
    # Base images: pinned (a tag or a digest, never :latest), and resolved from ARG defaults.
    for image in froms:
        if image in stages:
            continue
        assert "$" not in image, f"{path.name}: unresolved base image {image}"
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), f"unpinned {image}"
        assert not image.endswith(":latest"), f"{path.name}: {image} is not pinned"
    # The package installs from pyproject.toml and every top-level package.
    assert "pyproject.toml" in copied
    for package in top_level_packages():
        assert package in copied, f"{path.name} does not COPY {package}/"
    text = path.read_text()
    assert re.search(r'pip install (--python \S+ )?-c constraints\.txt "\.\[s3\]"', text), \
        "images need the s3 extra (s3fs), installed under constraints.txt (the tested numpy/scikit-learn)"
    assert "constraints.txt" in copied
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    users = [rest for k, rest in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, f"{path.name}: final stage must run as non-root"
    entrypoint = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert entrypoint and "refinery-entrypoint" in entrypoint[-1]
    cmd = json.loads([rest for k, rest in final if k == "CMD"][-1])
    assert cmd == (["api"] if name == "api" else ["worker"])
    if name == "api":
        health = [rest for k, rest in final if k == "HEALTHCHECK"]
        assert health and "/healthz" in health[-1]
        assert "download.pytorch.org/whl/cpu" in text
    elif name == "worker":
        assert "download.pytorch.org/whl/cpu" in text
    else:
        base = next(image for image in froms if image not in stages and "cuda" in image)
        assert base.startswith("nvidia/cuda:"), base
        assert "download.pytorch.org/whl/cpu" not in text, "the GPU image takes PyPI's CUDA torch wheel"
        assert "REFINERY_DEVICE=cuda" in text


def test_entrypoint_shortcuts_run_existing_code():
    script = ROOT / "docker" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111, "docker/entrypoint.sh must be executable"
    text = script.read_text()
    assert text.startswith("#!/bin/sh")
    commands = re.findall(r"^\s*exec (refinery .+|celery .+)$", text, re.MULTILINE)
    assert len(commands) == 3, commands
    for command in commands:
        argv = [a for a in shlex.split(command.replace('"$@"', "")) if "$" not in a]
        if argv[:2] == ["refinery", "api"]:
            argv += ["8000"]
        check_command(argv)


def test_dockerignore_keeps_the_build_context_small():
    for rel in [".git", ".venv", "tests", "helm", "bench", ".refinery", "api/__pycache__", "docker/Dockerfile.api"]:
        assert dockerignore_excludes(rel), f".dockerignore should exclude {rel}"
    for rel in ["pyproject.toml", "docker/entrypoint.sh", *top_level_packages()]:
        assert not dockerignore_excludes(rel), f".dockerignore must not exclude {rel}"


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "worker-gpu"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name, service in services.items():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image.split("/")[-1], f"{name}: unpinned {image!r}"
        if "build" in service:
            build = service["build"]
            assert build["context"] == "."
            assert (ROOT / build["dockerfile"]).exists(), f"{name}: {build['dockerfile']} does not exist"
    assert services["migrate"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    assert services["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.worker-gpu"


def test_compose_healthchecks_and_start_order(compose):
    services = compose["services"]
    checks = {name: " ".join(services[name]["healthcheck"]["test"]) for name in ("postgres", "redis", "minio", "api")}
    assert "pg_isready" in checks["postgres"]
    assert "redis-cli ping" in checks["redis"]
    assert "ready" in checks["minio"]
    assert "/healthz" in checks["api"]
    for name in ("postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "worker-gpu"):
        for dependency, condition in services[name].get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            wanted = "service_healthy" if "healthcheck" in services[dependency] else "service_completed_successfully"
            assert condition["condition"] == wanted, f"{name} -> {dependency}: {condition}"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for one_shot in ("migrate", "minio-init"):
        assert services[one_shot].get("restart") == "no"


def test_compose_commands_and_scaling(compose):
    services = compose["services"]
    check_command(services["migrate"]["command"])
    assert services["migrate"]["command"] == ["refinery", "migrate"]
    check_command(services["api"]["command"])
    assert services["api"]["ports"][0].endswith(":8000")
    for name in ("worker", "worker-gpu"):
        check_command(services[name]["command"])
    assert services["worker"]["deploy"]["replicas"] == 2
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["environment"]["REFINERY_DEVICE"] == "cuda"
    assert services["worker"]["environment"]["REFINERY_DEVICE"] == "cpu"
    from core.resources import parse_classes
    assert parse_classes(services["worker"]["environment"]["REFINERY_WORKER_CLASSES"]) == ["cpu", "cpu-x2"]
    assert parse_classes(gpu["environment"]["REFINERY_WORKER_CLASSES"]) == ["gpu"]
    bucket = services["minio-init"]["command"][0]
    assert "mc mb --ignore-existing" in bucket


def test_compose_environment_and_volumes(compose):
    shared = compose["x-refinery-env"]
    for key in ("REFINERY_DATABASE_URL", "REFINERY_BROKER_URL", "REFINERY_STORAGE_URL", "REFINERY_HOME",
                "REFINERY_DATA_ROOTS", "FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION"):
        assert key in shared, key
    assert shared["REFINERY_DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in shared[
        "REFINERY_DATABASE_URL"]
    assert shared["REFINERY_BROKER_URL"].startswith("redis://redis:6379/")
    assert shared["REFINERY_STORAGE_URL"].startswith("s3://")
    for name in ("migrate", "api", "worker", "worker-gpu"):
        env = compose["services"][name]["environment"]
        assert all(env.get(key) == value for key, value in shared.items()), f"{name} must use x-refinery-env"
    assert compose["services"]["api"]["environment"]["REFINERY_RUN_SWEEPER"] == "true"
    # Named volumes are declared; bind mounts are paths.
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".", "$")):
                assert source in declared, f"{name}: volume {source} is not declared"
    assert {"postgres-data", "redis-data", "minio-data"} <= declared
    # Settings in the environment are real settings.
    fields = settings_fields()
    for name, service in compose["services"].items():
        for key in service.get("environment", {}) or {}:
            if key.startswith("REFINERY_"):
                assert key.removeprefix("REFINERY_").lower() in fields, f"{name}: {key}"


# --------------------------------------------------------------------------------------------------------------
# A Go-template interpreter for the subset of text/template + Sprig + Helm the chart uses.


class TemplateError(Exception):
    pass


_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>"(?:\\.|[^"\\])*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
  | (?P<field>(?:\.[A-Za-z0-9_]+)+|\.)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<pipe>\|)
  | (?P<comma>,)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _go_float(value: float) -> str:
    """fmt's %v of a float64: Helm reads every number of a values file as float64, and prints 1e6 as "1e+06"."""
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # the decimal point sits after this many digits
    exp10 = point - 1
    if exp10 < -4 or exp10 >= 6:  # strconv's 'g' with the shortest precision
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'+' if exp10 >= 0 else '-'}{abs(exp10):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def go_str(value) -> str:
    if value is None:
        return ""  # Helm turns "<no value>" into ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, list):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_str(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def truthy(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


def go_values(data):
    """Values as Helm sees them: every number is a float64."""
    if isinstance(data, dict):
        return {k: go_values(v) for k, v in data.items()}
    if isinstance(data, list):
        return [go_values(v) for v in data]
    if isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    return data


def _plain(data):
    """For toYaml: integral floats print as integers (as Helm's JSON round trip does)."""
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    if isinstance(data, float) and data.is_integer() and abs(data) < 1e21:
        return int(data)
    return data


def _compare(a, b):
    kinds = []
    for v in (a, b):
        if isinstance(v, bool):
            kinds.append("bool")
        elif isinstance(v, int):
            kinds.append("int")
        elif isinstance(v, float):
            kinds.append("float")
        elif isinstance(v, str):
            kinds.append("str")
        else:
            raise TemplateError(f"invalid type for comparison: {a!r} {b!r}")
    if kinds[0] != kinds[1]:
        raise TemplateError(f"incompatible types for comparison: {a!r} ({kinds[0]}) and {b!r} ({kinds[1]})")


def _eq(a, *others):
    for b in others:
        _compare(a, b)
    return any(a == b for b in others)


def _to_int(value):
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            return 0
    return int(value)


def _printf(fmt, *args):
    args = list(args)

    def repl(match):
        verb = match.group(1)
        if verb == "%":
            return "%"
        value = args.pop(0)
        if verb == "d":
            return str(int(value))
        if verb == "q":
            return json.dumps(go_str(value))
        return go_str(value)

    return re.sub(r"%([sdvq%])", repl, fmt)


def _url_parse(text):
    parts = urllib.parse.urlsplit(text)
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    return {"scheme": parts.scheme, "host": parts.netloc.rpartition("@")[2], "hostname": parts.hostname or "",
            "path": parts.path, "query": parts.query, "fragment": parts.fragment, "opaque": "", "userinfo": userinfo}


def _required(message, value):
    if value is None or value == "":
        raise TemplateError(f"required: {message}")
    return value


def _default(fallback, *given):
    value = given[0] if given else None
    return value if truthy(value) else fallback


def _and(*args):
    for arg in args:
        if not truthy(arg):
            return arg
    return args[-1]


def _or(*args):
    for arg in args:
        if truthy(arg):
            return arg
    return args[-1]


def _index(collection, *keys):
    for key in keys:
        if collection is None:
            raise TemplateError(f"index of nil with {key!r}")
        collection = collection[int(key)] if isinstance(collection, list) else collection.get(key)
    return collection


def _to_yaml(value):
    if value is None:
        return "null"
    return yaml.safe_dump(_plain(value), default_flow_style=False, sort_keys=True, width=10**6).rstrip("\n")


def _from_yaml(text):
    return go_values(yaml.safe_load(text) or {})


def _fail(message):
    raise TemplateError(f"fail: {message}")


def _merge(dest, *sources):
    """Sprig's merge (mergo without override): each source fills the keys dest lacks or holds empty, recursively;
    dest is changed and returned."""
    for source in sources:
        for key, value in (source or {}).items():
            if isinstance(dest.get(key), dict) and isinstance(value, dict):
                _merge(dest[key], value)
            elif not truthy(dest.get(key)):
                dest[key] = copy.deepcopy(value)
    return dest


def _indent(width, text):
    pad = " " * int(width)
    return pad + text.replace("\n", "\n" + pad)


FUNCTIONS = {
    "and": _and,
    "or": _or,
    "not": lambda v: not truthy(v),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (_compare(a, b), a < b)[1],
    "le": lambda a, b: (_compare(a, b), a <= b)[1],
    "gt": lambda a, b: (_compare(a, b), a > b)[1],
    "ge": lambda a, b: (_compare(a, b), a >= b)[1],
    "len": lambda v: len(v or []),
    "index": _index,
    "print": lambda *a: "".join(go_str(v) for v in a),
    "printf": _printf,
    "default": _default,
    "required": _required,
    "empty": lambda v: not truthy(v),
    "quote": lambda *a: " ".join(json.dumps(go_str(v)) for v in a if v is not None),
    "squote": lambda *a: " ".join("'" + go_str(v) + "'" for v in a if v is not None),
    "toString": go_str,
    "int": _to_int,
    "int64": _to_int,
    "trunc": lambda n, s: s[: int(n)] if int(n) >= 0 else s[int(n):],
    "trimSuffix": lambda suffix, s: s.removesuffix(suffix),
    "trimPrefix": lambda prefix, s: s.removeprefix(prefix),
    "replace": lambda old, new, s: s.replace(old, new),
    "contains": lambda sub, s: sub in s,
    "upper": lambda s: s.upper(),
    "lower": lambda s: s.lower(),
    "dict": lambda *kv: {go_str(kv[i]): kv[i + 1] for i in range(0, len(kv), 2)},
    "list": lambda *items: list(items),
    "append": lambda items, item: [*(items or []), item],
    "join": lambda sep, items: sep.join(go_str(item) for item in (items or [])),
    "splitList": lambda sep, s: go_str(s).split(sep),
    "last": lambda items: items[-1] if items else None,
    "merge": _merge,
    "deepCopy": copy.deepcopy,
    "hasKey": lambda d, k: k in (d or {}),
    "omit": lambda d, *keys: {k: v for k, v in (d or {}).items() if k not in keys},
    "ternary": lambda a, b, cond: a if truthy(cond) else b,
    "toYaml": _to_yaml,
    "fromYaml": _from_yaml,
    "toJson": lambda v: json.dumps(_plain(v), sort_keys=True, separators=(",", ":")),
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "b64enc": lambda s: base64.b64encode(s.encode()).decode(),
    "urlParse": _url_parse,
    "fail": _fail,
}


class GoTemplate:
    """Parses every file of a chart's templates/ folder; renders one with Helm's top-level objects."""

    def __init__(self, chart_dir: Path, chart_name: str):
        self.defines: dict[str, list] = {}
        self.files: dict[str, list] = {}
        for path in sorted((chart_dir / "templates").iterdir()):
            name = f"{chart_name}/templates/{path.name}"
            self.files[name] = self._parse_file(path.read_text(), name)

    # -- parsing
    def _parse_file(self, text: str, name: str) -> list:
        tokens = []
        pos = 0
        for match in _ACTION.finditer(text):
            tokens.append(["text", text[pos:match.start()]])
            tokens.append(["action", match.group(2).strip(), bool(match.group(1)), bool(match.group(3))])
            pos = match.end()
        tokens.append(["text", text[pos:]])
        for i, token in enumerate(tokens):
            if token[0] != "action":
                continue
            if token[2] and i > 0:
                tokens[i - 1][1] = tokens[i - 1][1].rstrip(" \t\r\n")
            if token[3] and i + 1 < len(tokens):
                tokens[i + 1][1] = tokens[i + 1][1].lstrip(" \t\r\n")
        actions = [t for t in tokens if t[0] == "text" or not (t[1].startswith("/*") and t[1].endswith("*/"))]
        body, _, stop = self._parse_block(actions, 0, name)
        if stop is not None:
            raise TemplateError(f"{name}: unexpected {{{{{stop}}}}}")
        return body

    def _parse_block(self, tokens, index, name):
        """Nodes until an unmatched else/end; returns (nodes, next index, the stopping action or None)."""
        nodes = []
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if token[0] == "text":
                if token[1]:
                    nodes.append(("text", token[1]))
                continue
            action = token[1]
            word = action.split(None, 1)[0] if action else ""
            rest = action[len(word):].strip()
            if word in {"end", "else"}:
                return nodes, index, action
            if word in {"if", "with", "range"}:
                branches, else_body = [], []
                cond = rest
                while True:
                    body, index, stop = self._parse_block(tokens, index, name)
                    branches.append((self._parse_pipeline(cond, name), body))
                    if stop is None:
                        raise TemplateError(f"{name}: {{{{{word}}}}} without end")
                    if stop == "end":
                        break
                    if stop.startswith(("else if", "else with")):
                        cond = stop.split(None, 2)[2]
                        continue
                    else_body, index, stop = self._parse_block(tokens, index, name)
                    if stop != "end":
                        raise TemplateError(f"{name}: else without end")
                    break
                nodes.append((word, branches, else_body))
            elif word == "define":
                define_name = json.loads(rest)
                body, index, stop = self._parse_block(tokens, index, name)
                if stop != "end":
                    raise TemplateError(f"{name}: define {define_name} without end")
                self.defines[define_name] = body
            elif word in {"template", "block"}:
                raise TemplateError(f"{name}: use include, not {word}")
            else:
                nodes.append(("action", self._parse_pipeline(action, name)))
        return nodes, index, None

    def _parse_pipeline(self, text, name):
        tokens = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise TemplateError(f"{name}: cannot parse {text[pos:]!r} in {{{{{text}}}}}")
            pos = match.end()
            kind = match.lastgroup
            tokens.append((kind, match.group(kind)))
        declare, mode = [], None
        if any(kind in {"decl", "assign"} for kind, _ in tokens):
            cut = next(i for i, (kind, _) in enumerate(tokens) if kind in {"decl", "assign"})
            declare = [value for kind, value in tokens[:cut] if kind == "var"]
            mode = tokens[cut][0]
            tokens = tokens[cut + 1:]
        commands, _ = self._parse_commands(tokens, 0, name)
        return {"declare": declare, "mode": mode, "commands": commands}

    def _parse_commands(self, tokens, index, name):
        commands, current = [], []
        while index < len(tokens):
            kind, value = tokens[index]
            index += 1
            if kind == "pipe":
                commands.append(current)
                current = []
            elif kind == "lp":
                inner, index = self._parse_commands(tokens, index, name)
                current.append(("pipeline", {"declare": [], "mode": None, "commands": inner}))
            elif kind == "rp":
                break
            else:
                current.append((kind, value))
        commands.append(current)
        if any(not c for c in commands):
            raise TemplateError(f"{name}: empty command in pipeline")
        return commands, index

    # -- evaluation
    def render(self, name: str, top: dict) -> str:
        out: list[str] = []
        self._exec(self.files[name], top, [{"$": top}], out)
        return "".join(out)

    def _include(self, name, data):
        if name in self.defines:
            body = self.defines[name]
        elif name in self.files:
            body = self.files[name]
        else:
            raise TemplateError(f"include of undefined template {name!r}")
        out: list[str] = []
        self._exec(body, data, [{"$": data}], out)
        return "".join(out)

    def _exec(self, nodes, dot, scopes, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                value = self._pipeline(node[1], dot, scopes)
                if not node[1]["declare"]:
                    out.append(go_str(value))
            elif kind in {"if", "with"}:
                for pipe, body in node[1]:
                    scopes.append({})
                    value = self._pipeline(pipe, dot, scopes)
                    if truthy(value):
                        self._exec(body, value if kind == "with" else dot, scopes, out)
                        scopes.pop()
                        break
                    scopes.pop()
                else:
                    scopes.append({})
                    self._exec(node[2], dot, scopes, out)
                    scopes.pop()
            elif kind == "range":
                pipe, body = node[1][0]
                declare = pipe["declare"]
                collection = self._pipeline({**pipe, "declare": []}, dot, scopes)
                if isinstance(collection, dict):
                    items = [(k, collection[k]) for k in sorted(collection)]
                elif isinstance(collection, list):
                    items = list(enumerate(collection))
                elif collection is None:
                    items = []
                else:
                    raise TemplateError(f"range over {collection!r}")
                for key, element in items:
                    scope = {}
                    if len(declare) == 1:
                        scope[declare[0]] = element
                    elif len(declare) == 2:
                        scope[declare[0]], scope[declare[1]] = key, element
                    scopes.append(scope)
                    self._exec(body, element, scopes, out)
                    scopes.pop()
                if not items:
                    self._exec(node[2], dot, scopes, out)

    def _pipeline(self, pipe, dot, scopes):
        value, piped = None, False
        for command in pipe["commands"]:
            value = self._command(command, dot, scopes, value if piped else _NOTHING)
            piped = True
        for var in pipe["declare"]:
            if pipe["mode"] == "decl":
                scopes[-1][var] = value
            else:
                for scope in reversed(scopes):
                    if var in scope:
                        scope[var] = value
                        break
                else:
                    raise TemplateError(f"undefined variable {var}")
        return value

    def _command(self, command, dot, scopes, piped):
        head_kind, head = command[0]
        if head_kind == "ident" and head not in {"true", "false", "nil"}:
            args = [self._operand(op, dot, scopes) for op in command[1:]]
            if piped is not _NOTHING:
                args.append(piped)
            if head == "include":
                return self._include(*args)
            if head not in FUNCTIONS:
                raise TemplateError(f"function {head!r} is not known to this renderer")
            try:
                return FUNCTIONS[head](*args)
            except TemplateError:
                raise
            except Exception as exc:  # a Go template would fail to render too
                raise TemplateError(f"{head}{tuple(args)}: {exc!r}") from exc
        if len(command) != 1 or piped is not _NOTHING:
            raise TemplateError(f"cannot call non-function {head!r}")
        return self._operand(command[0], dot, scopes)

    def _operand(self, operand, dot, scopes):
        kind, value = operand
        if kind == "str":
            return json.loads(value)
        if kind == "raw":
            return value[1:-1]
        if kind == "num":
            return float(value) if "." in value else int(value)
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[value] if value in {"true", "false", "nil"} else (
                self._command([operand], dot, scopes, _NOTHING))
        if kind == "pipeline":
            return self._pipeline(value, dot, scopes)
        if kind == "field":
            return self._fields(dot, value.split(".")[1:] if value != "." else [], value)
        if kind == "var":
            name, *path = value.split(".")
            for scope in reversed(scopes):
                if name in scope:
                    return self._fields(scope[name], path, value)
            raise TemplateError(f"undefined variable {name}")
        raise TemplateError(f"unexpected {value!r}")

    @staticmethod
    def _fields(value, path, text):
        for part in path:
            if isinstance(value, dict):
                value = value.get(part)
            elif value is None:
                raise TemplateError(f"nil pointer evaluating {text}")
            else:
                raise TemplateError(f"can't evaluate field {part} in {text} ({type(value).__name__})")
        return value


_NOTHING = object()


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def render_chart(overrides: dict, release: str = "prod") -> dict[str, str]:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), overrides)
    engine = GoTemplate(CHART, chart["name"])
    out = {}
    for name in engine.files:
        filename = name.rsplit("/", 1)[1]
        if filename.startswith("_"):
            continue
        top = {
            "Values": go_values(values),
            "Chart": {k[0].upper() + k[1:]: v for k, v in chart.items()},
            "Release": {"Name": release, "Namespace": "refinery", "Service": "Helm", "IsInstall": True,
                        "IsUpgrade": False, "Revision": 1},
            "Template": {"Name": name, "BasePath": f"{chart['name']}/templates"},
            "Capabilities": {"KubeVersion": {"Version": "v1.31.0", "Major": "1", "Minor": "31"}},
        }
        out[filename] = engine.render(name, top)
    return out


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for filename, text in rendered.items():
        if not filename.endswith((".yaml", ".yml")):
            continue
        try:
            loaded = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise AssertionError(f"{filename} does not render to valid YAML: {exc}\n{text}") from exc
        for doc in loaded:
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{filename}: not a mapping: {doc!r}"
            doc["__file__"] = filename
            docs.append(doc)
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


BASE = {
    "externalDatabase": {"url": "postgresql://refinery:s3cret@pg.db.svc:5432/refinery"},
    "externalRedis": {"url": "redis://:s3cret@redis-master.db.svc:6379/1"},
}
GPU_POOLS = [
    {"name": "cpu", "classes": ["cpu", "cpu-x2"], "replicaCount": 3},
    {"name": "gpu", "classes": ["gpu"], "gpus": 1, "runtimeClassName": "nvidia",
     "nodeSelector": {"nvidia.com/gpu.present": "true"},
     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "resources": {"limits": {"memory": "32Gi", "nvidia.com/gpu": 8}}, "keda": {"enabled": True}},
    {"name": "gpu-x4", "classes": ["gpu-x4", "gpu-x2"], "gpus": 4, "replicaCount": 2,
     "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
     "resources": {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"memory": "256Gi"}}},
]
FULL = deep_merge(BASE, {
    "storage": {"s3": {"endpointUrl": "http://minio.storage:9000", "accessKeyId": "AKIA", "secretAccessKey": "x"}},
    "secrets": {"bootstrapToken": "rk_admin_test"},
    "extraEnv": [{"name": "REFINERY_SWEEP_SECONDS", "value": "2"}],
    "dataVolume": {"existingClaim": "datasets"},
    "imagePullSecrets": [{"name": "registry"}],
    "api": {"ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "t", "hosts": ["a.b"]}]}},
    "workerPools": GPU_POOLS,
    "keda": {"redis": {"passwordSecret": {"name": "redis-auth", "key": "password"}}},
})
EXISTING = {
    "secrets": {"existingSecret": "refinery-env"},
    "workerPools": [{"name": "cpu", "classes": ["cpu"]}, {"name": "gpu", "classes": ["gpu"], "gpus": 1,
                                                          "keda": {"enabled": True}}],
    "keda": {"redis": {"address": "redis:6379"}},
    "serviceAccount": {"create": False, "name": "refinery"},
}
VALUE_SETS = {"base": BASE, "full": FULL, "existing-secret": EXISTING}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def chart_docs(request):
    return request.param, manifests(render_chart(VALUE_SETS[request.param]))


def test_chart_and_values_parse():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "refinery" and chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(chart["version"]))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["externalDatabase"]["url"] == "" and "externalRedis" in values
    from core.resources import parse_classes
    assert [(pool["name"], parse_classes(",".join(pool["classes"]))) for pool in values["workerPools"]] == [
        ("cpu", ["cpu", "cpu-x2"])]  # by default one CPU pool, serving the test suite's two CPU classes
    assert values["workerDefaults"]["gpus"] == 0 and values["workerDefaults"]["keda"]["enabled"] is False
    assert values["config"]["queue"] == queue_name()
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False


def test_chart_requires_database_and_broker_urls():
    with pytest.raises(TemplateError, match="externalDatabase.url"):
        render_chart({})
    render_chart({"secrets": {"existingSecret": "mine"}})  # an existing Secret replaces both


def test_renderer_prints_numbers_as_helm_does():
    assert [_go_float(v) for v in (600.0, 86400.0, 2.5, 536870912.0, 0.0001)] == [
        "600", "86400", "2.5", "5.36870912e+08", "0.0001"]


def test_templates_render_to_kubernetes_objects(chart_docs):
    label, docs = chart_docs
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs), f"{label}: duplicate objects"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc["__file__"]
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Deployment", "Service", "Job"} <= kinds
    assert ("ServiceAccount" in kinds) == (label != "existing-secret")  # serviceAccount.create=false there
    assert ("Secret" in kinds) == (label != "existing-secret")
    if label == "full":
        assert {"Ingress", "ScaledObject", "TriggerAuthentication", "Secret", "PodDisruptionBudget"} <= kinds


def pod_specs(docs):
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"}:
            yield doc, doc["spec"]["template"]["spec"]


def test_pods_run_as_non_root_with_resources(chart_docs):
    _, docs = chart_docs
    for doc, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["automountServiceAccountToken"] is False
        mounted = set()
        for container in spec["containers"]:
            # args, not command: the image's ENTRYPOINT (tini + docker/entrypoint.sh) stays PID 1.
            assert "command" not in container and container["args"], doc["metadata"]["name"]
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert container["resources"].get("requests") or container["resources"].get("limits")
            mounted |= {m["mountPath"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
            for volume in spec["volumes"]:
                assert len(volume) == 2, f"volume without a source: {volume}"
        # A read-only root needs writable /tmp and REFINERY_HOME.
        assert {"/tmp", "/var/lib/refinery"} <= mounted, doc["metadata"]["name"]


def test_deployment_selectors_match_pod_labels(chart_docs):
    _, docs = chart_docs
    deployments = by_kind(docs, "Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    api = deployments["prod-refinery-api"]["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service")["prod-refinery-api"]
    assert service["spec"]["selector"].items() <= api.items()
    for ingress in by_kind(docs, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == "prod-refinery-api"
                assert path["backend"]["service"]["port"]["number"] == service["spec"]["ports"][0]["port"]


def env_of(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_env_references_resolve(chart_docs):
    label, docs = chart_docs
    fields = settings_fields()
    secrets = by_kind(docs, "Secret")
    config_maps = by_kind(docs, "ConfigMap")
    for doc, spec in pod_specs(docs):
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for name, entry in env_of(container).items():
                if name.startswith("REFINERY_"):
                    assert name.removeprefix("REFINERY_").lower() in fields, name
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                if label == "existing-secret":
                    assert ref["name"] == "refinery-env", (doc["metadata"]["name"], name)
                    continue
                assert ref["name"] in secrets, f"{doc['metadata']['name']}: {name} reads unknown Secret {ref}"
                if not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
    for config_map in config_maps.values():
        for key in config_map["data"]:
            if key.startswith("REFINERY_"):
                assert key.removeprefix("REFINERY_").lower() in fields, key
            assert isinstance(config_map["data"][key], str), key
        assert "e+" not in json.dumps(config_map["data"]), "a number printed in float notation"


def test_api_deployment(chart_docs):
    _, docs = chart_docs
    api = by_kind(docs, "Deployment")["prod-refinery-api"]
    container = api["spec"]["template"]["spec"]["containers"][0]
    check_command(container["args"])
    assert container["args"][:2] == ["refinery", "api"]
    assert container["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(container)
    for name in ("REFINERY_DATABASE_URL", "REFINERY_BROKER_URL", "REFINERY_BOOTSTRAP_TOKEN"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["REFINERY_RUN_SWEEPER"]["value"] == "true"
    assert container["image"].startswith("refinery/api:")


def class_queue(resource_class: str) -> str:
    from core.resources import queue_for
    return queue_for(resource_class, queue_name())


def test_workers(chart_docs):
    label, docs = chart_docs
    values = VALUE_SETS[label].get("workerPools") or yaml.safe_load((CHART / "values.yaml").read_text())["workerPools"]
    deployments = by_kind(docs, "Deployment")
    workers = {name: d for name, d in deployments.items() if name.startswith("prod-refinery-worker-")}
    assert set(workers) == {f"prod-refinery-worker-{pool['name']}" for pool in values}, "one Deployment per pool"
    config = by_kind(docs, "ConfigMap").get("prod-refinery", {}).get("data", {})
    if config:
        assert config["REFINERY_QUEUE"] == queue_name()
    from core.resources import parse_classes
    served = []
    for pool in values:
        deployment = workers[f"prod-refinery-worker-{pool['name']}"]
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        check_command(container["args"])
        assert spec["terminationGracePeriodSeconds"] >= 60
        env = env_of(container)
        classes = parse_classes(env["REFINERY_WORKER_CLASSES"]["value"])  # what the worker will accept at start
        assert classes == pool["classes"]
        served += classes
        gpus = pool.get("gpus", 0)
        assert env["REFINERY_DEVICE"]["value"] == ("cuda" if gpus else "cpu")
        assert container["image"].startswith("refinery/worker-gpu:" if gpus else "refinery/worker:")
        assert "secretKeyRef" in env["REFINERY_DATABASE_URL"]["valueFrom"]
        assert "REFINERY_BOOTSTRAP_TOKEN" not in env
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (gpus or None)
        autoscaled = pool.get("keda", {}).get("enabled", False)
        assert ("replicas" not in deployment["spec"]) == autoscaled, "KEDA owns an autoscaled pool's replica count"
        if not autoscaled:
            assert deployment["spec"]["replicas"] == pool.get("replicaCount", 1)
    assert len(served) == len(set(served)), "each class is served by one pool"


def test_gpu_pools_request_their_gpus_and_nodes():
    docs = manifests(render_chart(FULL))
    deployments = by_kind(docs, "Deployment")
    gpu = deployments["prod-refinery-worker-gpu"]
    spec = gpu["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # the pool's gpus, not a stray limits entry
    assert container["resources"]["limits"]["memory"] == "32Gi"
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}  # workerDefaults
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert gpu["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    x4 = deployments["prod-refinery-worker-gpu-x4"]
    spec = x4["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "16", "memory": "128Gi"},
                                      "limits": {"memory": "256Gi", "nvidia.com/gpu": 4}}
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert "tolerations" not in spec and "runtimeClassName" not in spec
    assert x4["spec"]["replicas"] == 2
    cpu = deployments["prod-refinery-worker-cpu"]
    assert "strategy" not in cpu["spec"] and "nvidia.com/gpu" not in cpu["spec"]["template"]["spec"][
        "containers"][0]["resources"]["limits"]
    without_keda = deep_merge(FULL, {"workerPools": [{**GPU_POOLS[1], "keda": {"enabled": False},
                                                      "replicaCount": 3}]})
    docs = manifests(render_chart(without_keda))
    assert by_kind(docs, "Deployment")["prod-refinery-worker-gpu"]["spec"]["replicas"] == 3
    assert not by_kind(docs, "ScaledObject") and not by_kind(docs, "TriggerAuthentication")
    with pytest.raises(TemplateError, match="classes"):
        render_chart(deep_merge(BASE, {"workerPools": [{"name": "empty"}]}))


def test_keda_scales_each_pool_on_its_own_queues():
    docs = manifests(render_chart(deep_merge(FULL, {"workerPools": [
        GPU_POOLS[0], GPU_POOLS[1], {**GPU_POOLS[2], "keda": {"enabled": True, "maxReplicaCount": 2}}]})))
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"prod-refinery-worker-gpu", "prod-refinery-worker-gpu-x4"}  # not the cpu pool
    deployments = by_kind(docs, "Deployment")
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"]["name"] == name and name in deployments
    assert scaled["prod-refinery-worker-gpu-x4"]["spec"]["maxReplicaCount"] == 2
    assert scaled["prod-refinery-worker-gpu"]["spec"]["maxReplicaCount"] == 4  # workerDefaults
    trigger = scaled["prod-refinery-worker-gpu"]["spec"]["triggers"]
    assert [t["metadata"] for t in trigger] == [{
        "address": "redis-master.db.svc:6379", "listName": class_queue("gpu"), "listLength": "1",
        "activationListLength": "0", "databaseIndex": "1", "enableTLS": "false"}]
    assert class_queue("gpu") == queue_name() + ".gpu"
    lists = [t["metadata"]["listName"] for t in scaled["prod-refinery-worker-gpu-x4"]["spec"]["triggers"]]
    assert lists == [class_queue("gpu-x4"), class_queue("gpu-x2")]  # one trigger per class the pool serves
    auth = by_kind(docs, "TriggerAuthentication")[trigger[0]["authenticationRef"]["name"]]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "redis-auth", "key": "password"}]
    docs = manifests(render_chart(EXISTING))
    trigger = by_kind(docs, "ScaledObject")["prod-refinery-worker-gpu"]["spec"]["triggers"][0]
    assert trigger["metadata"]["address"] == "redis:6379" and "authenticationRef" not in trigger
    tls = deep_merge(BASE, {"externalRedis": {"url": "rediss://r:6380"},
                            "workerPools": [{"name": "cpu", "classes": ["cpu"], "keda": {"enabled": True}}]})
    scaled = by_kind(manifests(render_chart(tls)), "ScaledObject")["prod-refinery-worker-cpu"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["enableTLS"] == "true" and trigger["metadata"]["databaseIndex"] == "0"
    assert trigger["metadata"]["listName"] == queue_name()  # the cpu class is on the base queue


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(chart_docs):
    label, docs = chart_docs
    job = by_kind(docs, "Job")["prod-refinery-migrate"]
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert "serviceAccountName" not in spec, "the chart's ServiceAccount does not exist yet during pre-install"
    container = spec["containers"][0]
    check_command(container["args"])
    assert container["args"] == ["refinery", "migrate"]
    env = env_of(container)
    assert "envFrom" not in container, "the ConfigMap does not exist yet during pre-install"
    assert env["REFINERY_HOME"]["value"] == "/var/lib/refinery"
    ref = env["REFINERY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    if label == "existing-secret":
        assert ref["name"] == "refinery-env"
        return
    # The Secret it reads is itself a hook, created before the Job.
    secret = by_kind(docs, "Secret")[ref["name"]]
    hook = secret["metadata"]["annotations"]
    assert set(hook["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert int(hook["helm.sh/hook-weight"]) < int(annotations.get("helm.sh/hook-weight", "0"))
    assert secret["stringData"][ref["key"]] == BASE["externalDatabase"]["url"]


def test_notes_render():
    notes = render_chart(FULL)["NOTES.txt"]
    assert "prod-refinery-api" in notes and "KEDA" in notes
    assert "prod-refinery-worker-gpu-x4: classes gpu-x4, gpu-x2, 2 pod(s), 4 GPU(s) each" in notes


@pytest.mark.skipif(shutil.which("helm") is None, reason="no helm binary on PATH")
def test_helm_lint_and_template(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(FULL))
    subprocess.run(["helm", "lint", str(CHART), "-f", str(values)], check=True, capture_output=True, timeout=60)
    result = subprocess.run(["helm", "template", "prod", str(CHART), "-f", str(values)], check=True,
                            capture_output=True, text=True, timeout=60)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    ours = {(d["kind"], d["metadata"]["name"]) for d in manifests(render_chart(FULL))}
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == ours


def test_multi_node_pools_give_each_pod_its_address_and_the_rendezvous_port():
    """A `-nM` class's pods reach each other by pod IP (downward API) and the leader's rendezvous port."""
    from core.settings import Settings
    pool = {"name": "gpu-x8-n2", "classes": ["gpu-x8-n2"], "gpus": 8, "replicaCount": 2}
    deployments = by_kind(manifests(render_chart(deep_merge(BASE, {"workerPools": [GPU_POOLS[0], pool]}))),
                          "Deployment")
    container = deployments["prod-refinery-worker-gpu-x8-n2"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["REFINERY_WORKER_ADDRESS"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29400}]
    settings = Settings(worker_classes=env["REFINERY_WORKER_CLASSES"]["value"],
                        rendezvous_port=env["REFINERY_RENDEZVOUS_PORT"]["value"])  # what the worker reads at start
    assert settings.rendezvous_port == 29400 and settings.worker_classes == "gpu-x8-n2"
    single = deployments["prod-refinery-worker-cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert "REFINERY_WORKER_ADDRESS" not in env_of(single) and "ports" not in single
    with pytest.raises(TemplateError, match="replicaCount >= 2"):  # one pod could never run a 2-node job
        render_chart(deep_merge(BASE, {"workerPools": [{**pool, "replicaCount": 1}]}))
