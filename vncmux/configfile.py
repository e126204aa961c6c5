"""The one reader of the INI file that ``twistd vncmux --config`` and ``vncmux token --config``
share.

No interpolation: a ``%`` in a value (a percent-encoded Redis password) is literal. A file that
cannot be read or parsed is a L{ConfigFileError} whose message names the file and the line but
never quotes a line: lines hold passwords.
"""

from __future__ import annotations

import configparser

SECTION = "vncmux"


class ConfigFileError(ValueError):
    """The config file cannot be used; the message is for the operator (no file content)."""


def read_config(path: str) -> dict[str, str]:
    """The options of the ``[vncmux]`` section of C{path}, names as written in the file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigFileError(f"config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path}: not UTF-8 text") from None
    except configparser.Error as e:
        raise ConfigFileError(f"config file {path}: {_describe(e)}") from None
    if not parser.has_section(SECTION):
        raise ConfigFileError(f"config file {path}: no [{SECTION}] section")
    return dict(parser.items(SECTION))


def read_flag(path: str, name: str, value: str) -> bool:
    """A yes/no option of the file, spelt as configparser's C{getboolean} takes it."""
    try:
        return configparser.ConfigParser.BOOLEAN_STATES[value.strip().lower()]
    except KeyError:
        raise ConfigFileError(f"config file {path}: {name} is not yes or no") from None


def _describe(error: configparser.Error) -> str:
    """What is wrong and where, without the offending line (it may hold a password)."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: an option before the first [section]"
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: section [{error.section}] given twice"
    if isinstance(error, configparser.DuplicateOptionError):
        return f"line {error.lineno}: option {error.option!r} given twice in [{error.section}]"
    if isinstance(error, configparser.ParsingError):
        lines = ", ".join(str(number) for number, _ in error.errors)
        return f"not 'name = value' (line {lines})"
    return type(error).__name__


__all__ = ["SECTION", "ConfigFileError", "read_config", "read_flag"]
