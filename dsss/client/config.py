# -*- test-case-name: tests.unit.test_client_catalog_config -*-
"""The client's settings: command line, then environment, then config file, then defaults.

The config file is TOML, `~/.config/dsss/config.toml` unless `--config FILE` or `$DSSS_CONFIG`
names another one:

    server = "http://192.0.2.10:8470"
    key = "~/.config/dsss/work.key"     # ~ is expanded; a relative path is relative to this file
    part-size = "4M"                    # or a number of bytes
    parallel = 8
    erasure = "2/4"                     # store parts as k-of-n shares ("off": whole replicas)

Pure functions over values: nothing here reads the environment or the home directory except
through the arguments it is given.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from dsss.crypto.parts import TAG_BYTES
from dsss.erasure import Coding, CodingError
from dsss.errors import BadRequest, LocalUsageError
from dsss.model import parse_size
from dsss.wire.transfer import MAX_PART

DEFAULT_SERVER = "http://127.0.0.1:8470"
DEFAULT_PART_SIZE = 4 * 1024 * 1024
DEFAULT_PARALLEL = 4
MAX_PART_SIZE = MAX_PART - TAG_BYTES
MAX_PARALLEL = 64
MAX_CONFIG_BYTES = 64 * 1024
KEYS = ("server", "key", "part-size", "parallel", "erasure")
ERASURE_OFF = ("off", "none", "no")

FROM_COMMAND_LINE = "command line"
FROM_DEFAULT = "default"


class ConfigError(LocalUsageError):
    """A bad config file or a bad setting (exit code 2, like other usage errors)."""

    exit_code = 2
    code = "config"


def home_config_dir(home: Path) -> Path:
    return home / ".config" / "dsss"


def config_location(*, option: str | None, env: Mapping[str, str], home: Path) -> tuple[Path, bool]:
    """Which config file to read, and whether it must exist (named explicitly)."""
    if option:
        return Path(option).expanduser(), True
    if env.get("DSSS_CONFIG"):
        return Path(env["DSSS_CONFIG"]).expanduser(), True
    return home_config_dir(home) / "config.toml", False


def check_server_url(url: str) -> str:
    """An `http://` or `https://` URL with a host and a valid port; trailing `/` removed."""
    if not isinstance(url, str):
        raise BadRequest("the server URL must be a string")
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise BadRequest(f"the server URL has a bad port: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"server URL must look like http://HOST:PORT, got {url!r}")
    if parts.query or parts.fragment:
        raise BadRequest(f"the server URL must not have a query or fragment: {url!r}")
    return url.rstrip("/")


def check_part_size(value: int | str) -> int:
    """A part size as bytes (an int) or a size string (`512K`, `4M`), within 1..16 MiB - 16."""
    if isinstance(value, bool):
        raise BadRequest("a part size is a number of bytes or a size such as 512K or 4M")
    size = value if isinstance(value, int) else parse_size(value)
    if not 1 <= size <= MAX_PART_SIZE:
        raise BadRequest(f"part size must be between 1 and {MAX_PART_SIZE} bytes, got {size}")
    return size


def check_parallel(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise BadRequest(f"parallel must be a whole number from 1 to {MAX_PARALLEL}, got {value!r}")
    return value


def check_erasure(value: Any) -> Coding | None:
    """`K/N` (say "2/4"): erasure-code new files' parts; "off": store whole replicas."""
    if not isinstance(value, str):
        raise BadRequest('erasure must be a string such as "2/4", or "off"')
    if value.strip().lower() in ERASURE_OFF:
        return None
    try:
        return Coding.parse(value)
    except CodingError as e:
        raise BadRequest(str(e)) from None


@dataclass(frozen=True)
class FileConfig:
    """What a config file says; None for a setting it leaves out."""

    path: Path | None = None
    server: str | None = None
    key: Path | None = None
    part_size: int | None = None
    parallel: int | None = None
    erasure: Coding | None = None
    erasure_set: bool = False  # the file names `erasure` (maybe "off")


def parse_config(text: str, *, path: Path) -> FileConfig:
    """Parse and check the text of a config file; ConfigError names the file and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(doc, path=path)


def _key_path(raw: Any, config_path: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise BadRequest("must be the path of a key file (a string)")
    key = Path(raw).expanduser()
    return key if key.is_absolute() else config_path.parent / key


def _part_size(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise BadRequest("must be a number of bytes or a size such as \"4M\"")
    return check_part_size(raw)


def config_from_dict(doc: Mapping[str, Any], *, path: Path) -> FileConfig:
    unknown = sorted(k for k in doc if k not in KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(KEYS)})"
        )
    checks: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "server": ("server", check_server_url),
        "key": ("key", lambda raw: _key_path(raw, path)),
        "part-size": ("part_size", _part_size),
        "parallel": ("parallel", check_parallel),
        "erasure": ("erasure", check_erasure),
    }
    values: dict[str, Any] = {}
    for name, (attr, check) in checks.items():
        if name in doc:
            try:
                values[attr] = check(doc[name])
            except BadRequest as e:
                raise ConfigError(f"{path}: {name}: {e}") from None
    return FileConfig(path=path, erasure_set="erasure" in values, **values)


def load_config(path: Path, *, required: bool) -> FileConfig:
    """Read a config file; a missing file is an empty config unless `required`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"no config file at {path}") from None
        return FileConfig()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it a config file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, path=path)


@dataclass(frozen=True)
class Settings:
    """The settings in force, and where each came from (for `config` and error messages)."""

    server: str
    key: Path
    part_size: int
    parallel: int
    config_file: Path | None
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    erasure: Coding | None = None  # new files' parts as k-of-n shares; None: whole replicas


def resolve(
    *,
    server: str | None,
    key: str | None,
    part_size: str | None,
    parallel: int | None,
    env: Mapping[str, str],
    file: FileConfig,
    home: Path,
    erasure: str | None = None,
) -> Settings:
    """Command line > environment ($DSSS_SERVER, $DSSS_KEY) > config file > built-in default."""
    sources: dict[str, str] = {}
    where = f"config file {file.path}" if file.path else "config file"

    if server is not None:
        server_v, sources["server"] = check_server_url(server), FROM_COMMAND_LINE
    elif env.get("DSSS_SERVER"):
        try:
            server_v = check_server_url(env["DSSS_SERVER"])
        except BadRequest as e:
            raise ConfigError(f"$DSSS_SERVER: {e}") from None
        sources["server"] = "$DSSS_SERVER"
    elif file.server is not None:
        server_v, sources["server"] = file.server, where
    else:
        server_v, sources["server"] = DEFAULT_SERVER, FROM_DEFAULT

    if key is not None:
        key_v, sources["key"] = Path(key).expanduser(), FROM_COMMAND_LINE
    elif env.get("DSSS_KEY"):
        key_v, sources["key"] = Path(env["DSSS_KEY"]).expanduser(), "$DSSS_KEY"
    elif file.key is not None:
        key_v, sources["key"] = file.key, where
    else:
        key_v, sources["key"] = home_config_dir(home) / "key", FROM_DEFAULT

    if part_size is not None:
        part_v, sources["part-size"] = check_part_size(part_size), FROM_COMMAND_LINE
    elif file.part_size is not None:
        part_v, sources["part-size"] = file.part_size, where
    else:
        part_v, sources["part-size"] = DEFAULT_PART_SIZE, FROM_DEFAULT

    if parallel is not None:
        par_v, sources["parallel"] = check_parallel(parallel), FROM_COMMAND_LINE
    elif file.parallel is not None:
        par_v, sources["parallel"] = file.parallel, where
    else:
        par_v, sources["parallel"] = DEFAULT_PARALLEL, FROM_DEFAULT

    if erasure is not None:
        try:
            erasure_v, sources["erasure"] = check_erasure(erasure), FROM_COMMAND_LINE
        except BadRequest as e:
            raise ConfigError(f"--erasure: {e}") from None
    elif file.erasure_set:
        erasure_v, sources["erasure"] = file.erasure, where
    else:
        erasure_v, sources["erasure"] = None, FROM_DEFAULT

    return Settings(server_v, key_v, part_v, par_v, file.path, sources, erasure_v)


def settings_from(
    *,
    config_option: str | None,
    server: str | None,
    key: str | None,
    part_size: str | None,
    parallel: int | None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    erasure: str | None = None,
) -> Settings:
    """Find and read the config file, then resolve every setting."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    path, required = config_location(option=config_option, env=env, home=home)
    file = load_config(path, required=required)
    return resolve(server=server, key=key, part_size=part_size, parallel=parallel,
                   env=env, file=file, home=home, erasure=erasure)
