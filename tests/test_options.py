"""The options table: the one place an option is declared, and what is made from it."""

from __future__ import annotations

import dataclasses
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from vncmux.configfile import ConfigFileError
from vncmux.options import BY_NAME, OPTIONS, read_options_file
from vncmux.settings import Limits, Settings
from vncmux.tap import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_INI = os.path.join(ROOT, "etc", "vncmux.ini")
#: ``# name = value`` lines of etc/vncmux.ini: each documents one option.
DOCUMENTED = re.compile(r"^# ([a-z_]+) = (.*)$", re.M)


class TableTests(SynchronousTestCase):
    """Everything made from the table agrees with it."""

    def test_settings_are_the_options(self) -> None:
        """Every field of Settings and Limits is an option's place (but the two that are
        not options), and their defaults are the options' defaults."""
        targets = {o.target: o for o in OPTIONS if o.target is not None}
        settings, limits = Settings(), Limits()
        for field in dataclasses.fields(Settings):
            if field.name != "limits":
                self.assertIn(field.name, targets)
                self.assertEqual(getattr(settings, field.name), targets[field.name].default)
        for field in dataclasses.fields(Limits):
            if field.name != "sweep_interval":
                option = targets[f"limits.{field.name}"]
                self.assertEqual(getattr(limits, field.name), option.default)
        places = {f.name for f in dataclasses.fields(Settings) if f.name != "limits"}
        places |= {f"limits.{f.name}" for f in dataclasses.fields(Limits)}
        self.assertEqual(set(targets), places - {"limits.sweep_interval"})

    def test_twistd_options_are_the_table(self) -> None:
        """twistd's parameters, flags and repeatable options are the table's, and the
        settings of no arguments are Settings()."""
        options = Options()
        made = {p[0] for p in options.optParameters} | {f[0] for f in options.optFlags}
        made |= {name.replace("_", "-") for name in ("allowed_origin", "trusted_proxy")}
        made.add("allowed-backend")
        self.assertEqual(made, set(BY_NAME))
        for name in ("allowed-origin", "trusted-proxy", "allowed-backend"):
            self.assertEqual(getattr(Options, "opt_" + name.replace("-", "_")).__doc__,
                             BY_NAME[name].help)  # fmt: skip
        options.parseOptions([])
        self.assertEqual(options.settings(), Settings())

    def test_example_file_documents_every_option(self) -> None:
        """etc/vncmux.ini documents each option once, as ``# name = value``: the default
        where there is one, else an example that parses; and it reads as a config file."""
        with open(EXAMPLE_INI) as f:
            documented = DOCUMENTED.findall(f.read())
        names = [name for name, _ in documented]
        self.assertEqual(sorted(names), sorted(o.file_name for o in OPTIONS if o.name != "config"))
        for file_name, shown in documented:
            option = BY_NAME[file_name.replace("_", "-")]
            with self.subTest(option=option.name):
                if option.kind == "repeated":
                    [option.parse(item) for item in shown.split()]
                elif option.kind == "flag":
                    self.assertEqual(shown, "false")
                elif option.default is None:
                    option.parse(shown)
                else:
                    self.assertEqual(option.parse(shown), option.default)
        read_options_file(EXAMPLE_INI)


class FileTests(SynchronousTestCase):
    """read_options_file: the reader of twistd vncmux and vncmux token."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_values_are_parsed(self) -> None:
        """Values are parsed as on the command line; repeated ones split on spaces."""
        path = self.write(
            "[vncmux]\nidle_timeout = 60\nenforce_expiry = yes\nmetrics = none\n"
            "allowed_backend = 10.0.0.0/8 fd00::1\n"
        )
        values = read_options_file(path)
        self.assertEqual(values["idle-timeout"], 60.0)
        self.assertIs(values["enforce-expiry"], True)
        self.assertIsNone(values["metrics"])
        self.assertEqual([str(n) for n in values["allowed-backend"]], ["10.0.0.0/8", "fd00::1/128"])

    def test_bad_value_names_file_and_option(self) -> None:
        """A bad value is a ConfigFileError naming the file and the option."""
        path = self.write("[vncmux]\nmax_sessions = many\n")
        error = self.assertRaises(ConfigFileError, read_options_file, path)
        self.assertIn(path, str(error))
        self.assertIn("max_sessions", str(error))

    def test_config_is_not_an_option_of_the_file(self) -> None:
        """A file cannot name another config file."""
        path = self.write("[vncmux]\nconfig = other.ini\n")
        error = self.assertRaises(ConfigFileError, read_options_file, path)
        self.assertIn("unknown option 'config'", str(error))
