"""The errors a user sees at startup. Neither is a ValueError on purpose: vLLM builds its config
inside pydantic validators, which wrap a ValueError into a ValidationError dump; these pass through
with their message intact (and plugin.register() prints them alone, see plugin._print_config_errors)."""

from __future__ import annotations


class KVTunerConfigError(Exception):
    """A configuration kvtuner cannot serve; the message names the problem and the fix."""


class UnsupportedConfigError(KVTunerConfigError):
    """A model or vLLM feature this dtype cannot serve; raised at startup, never at run time."""
