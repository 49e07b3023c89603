"""The --help format of every `minimamba` command: each option's default shown once."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already says its default.

    Flags (store_true / store_false) say what they do instead: their default is "off",
    and argparse's own ArgumentDefaultsHelpFormatter would print "(default: True)" for
    a --no-something flag. An option whose default is None says what None means in its
    help text, or shows nothing.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if (not action.option_strings or flag or action.default in (None, argparse.SUPPRESS)
                or "default" in text or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()
