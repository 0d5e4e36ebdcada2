"""``ConfigModel``: the one base of every cubeline configuration (params.yaml, Phase 2, gate).

A pydantic v2 model with ``extra="forbid"`` and ``frozen=True``: a misspelt key fails when the
file is read, before any data is touched, and a loaded config cannot drift while a run uses it.
pydantic's ``ValidationError`` never escapes: it becomes :class:`nodes.errors.ConfigError` whose
message names the dotted field path, the file and section (when given), the valid fields and the
closest match of a misspelt one. ``from_dict`` / ``to_dict`` and ``from_yaml`` / ``to_yaml``
round-trip.
"""

from __future__ import annotations

import difflib
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Self, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from nodes.errors import ConfigError

__all__ = ["ConfigModel"]


# --------------------------------------------------------------------------------------------
# error formatting
# --------------------------------------------------------------------------------------------


def _unwrap_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """Return the config model inside an annotation and whether it sits in a sequence.

    Handles ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``Sequence[X]`` and ``Annotated[X, ...]``;
    anything else resolves to ``(None, False)``.
    """
    origin = get_origin(annotation)
    if origin is Annotated:
        return _unwrap_model(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            model, seq = _unwrap_model(arg)
            if model is not None:
                return model, seq
        return None, False
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if len(args) == 1:
            model, _ = _unwrap_model(args[0])
            return model, True
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk ``loc`` (a pydantic error location) from ``root`` to the model that owns its tail."""
    model: type[BaseModel] | None = root
    expect_index = False
    for part in loc:
        if model is None:
            return None
        if expect_index:
            if not isinstance(part, int):
                return None
            expect_index = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model, expect_index = _unwrap_model(field.annotation)
    return model if not expect_index else None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe_error(root: type[BaseModel], err: Any) -> str:
    loc: tuple[int | str, ...] = tuple(err.get("loc", ()))
    path = _dotted(loc) if loc else root.__name__
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        owner = _model_at(root, loc[:-1])
        name = str(loc[-1])
        if owner is not None:
            valid = list(owner.model_fields)
            hint = difflib.get_close_matches(name, valid, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            return (
                f"{path}: unknown field '{name}'.{did_you_mean} Valid fields of "
                f"{owner.__name__}: {', '.join(valid)}."
            )
        return f"{path}: unknown field '{name}'."
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and kind not in ("missing",) and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}"


def _config_error(
    cls: type[BaseModel],
    exc: ValidationError,
    *,
    source: str | os.PathLike[str] | None = None,
    section: str | None = None,
) -> ConfigError:
    where = f" in {os.fspath(source)}" if source is not None else ""
    if section:
        where += f" (section '{section}')"
    lines = [_describe_error(cls, err) for err in exc.errors()]
    body = "\n".join(f"  - {line}" for line in lines)
    return ConfigError(
        f"Invalid {cls.__name__}{where}: {len(lines)} problem(s):\n{body}\n"
        "Fix or remove the fields named above."
    )


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


class ConfigModel(BaseModel):
    """Common base: frozen, unknown fields rejected, dict/YAML round trip, ConfigError on failure.

    ``from_dict(cfg.to_dict()) == cfg`` and ``from_yaml`` of a ``to_yaml`` file give an equal
    config back.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(type(self), exc) from None

    # Marks this __init__ as pydantic's own (as RootModel does), so nested configs are validated
    # by pydantic-core without calling it: errors then keep their full dotted path and all of
    # them are reported together, instead of the first nested one escaping as a ConfigError.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigError(
            f"{type(self).__name__} is frozen: cannot set '{name}'. Build a changed copy with "
            f"cfg.replace({name}=...)."
        )

    def __delattr__(self, name: str) -> None:
        raise ConfigError(f"{type(self).__name__} is frozen: cannot delete '{name}'.")

    def replace(self, **changes: Any) -> Self:
        """Return a validated copy with ``changes`` applied (like ``dataclasses.replace``).

        Raises:
            ConfigError: When the changed config is invalid.
        """
        data = self.to_dict()
        for key, value in changes.items():
            data[key] = value.to_dict() if isinstance(value, ConfigModel) else value
        return type(self).from_dict(data)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any] | None,
        *,
        source: str | os.PathLike[str] | None = None,
        section: str | None = None,
    ) -> Self:
        """Validate a plain mapping (e.g. a ``params.yaml`` section) into this config.

        Args:
            data: The mapping; ``None`` (an empty YAML section) means all defaults.
            source: File the mapping came from, named in error messages.
            section: Section of ``source`` the mapping came from, named in error messages.

        Raises:
            ConfigError: When a field is unknown, missing or invalid.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            where = f" in {os.fspath(source)}" if source is not None else ""
            raise ConfigError(
                f"{cls.__name__}{where} must be a mapping of field names to values, got "
                f"{type(data).__name__}. Valid fields: {', '.join(cls.model_fields)}."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(cls, exc, source=source, section=section) from None

    def to_dict(self) -> dict[str, Any]:
        """Return plain Python data (dicts, lists, str, numbers, bool, None) safe for YAML/JSON."""
        return self.model_dump(mode="json")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, section: str | None = None) -> Self:
        """Read this config from a YAML file, optionally from a (dotted) section of it.

        Args:
            path: The YAML file.
            section: Dotted key of the sub-mapping to read (``"train.gradient"``); ``None``
                reads the whole document.

        Raises:
            ConfigError: When the file is missing or not YAML, the section is absent, or the
                content does not validate.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"Config file {p} does not exist; pass the path of an existing YAML file."
            ) from None
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {p}: {exc}.") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"Config file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                "it as UTF-8 YAML."
            ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {p} is not valid YAML: {exc}") from None
        if section:
            node: Any = doc
            walked: list[str] = []
            for key in section.split("."):
                if not isinstance(node, dict) or key not in node:
                    have = ", ".join(map(str, node)) if isinstance(node, dict) else "(no mapping)"
                    at = ".".join(walked) or "top level"
                    raise ConfigError(
                        f"Config file {p} has no section '{section}' (missing key '{key}' at "
                        f"{at}; keys there: {have})."
                    )
                node = node[key]
                walked.append(key)
            doc = node
        return cls.from_dict(doc, source=p, section=section)

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write this config as YAML, atomically (a failed write leaves no partial file).

        Returns:
            The path written.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p
