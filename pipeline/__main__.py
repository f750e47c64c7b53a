"""`python -m pipeline stage=<name>`: the one entry point.

Only Hydra is imported at module level so that `--help` stays fast; torch, transformers and
mlflow load inside the stages.
"""

import os
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import register

CONF = Path(__file__).resolve().parent.parent / "conf"
register()  # the typed schemas the config groups build on, before Hydra composes them
# Hydra's options that take a value: the argument after one is not an override.
VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                 "--experimental-rerun", "--info", "-i"}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.contract import USER_ERRORS
    from pipeline.hardware import COMPARE

    if cfg.train.precision == COMPARE:  # several runs and a report (pipeline.compare), else one run
        from pipeline.compare import run_comparison as run
    else:
        from pipeline.runner import run
    try:
        run(cfg)
    except USER_ERRORS as error:
        # A bad setting, a path, a refused precision, a failed gate: the message says what to
        # change, and a traceback would only bury it.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One line, always: where a message brings more (a tool's output), the rest is kept in a file.
        first, *rest = str(error).strip().splitlines() or [type(error).__name__]
        if rest:
            from pipeline.artifacts import keep_log

            first += f" (the rest of this message: {keep_log('error', str(error))})"
        print(f"error: {first}", file=sys.stderr)
        sys.exit(1)


def check_overrides(argv: list[str]) -> None:
    """Hydra refuses an override its grammar does not take (a path with spaces or parentheses,
    unquoted) with several lines and a traceback hint: one line instead, with the override quoted
    so that it can be pasted. Arguments after an override that hold no "=" and are no override of
    their own are most likely the rest of its value, split by the shell at spaces."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()

    def refusal(override: str) -> OverrideParseException | None:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as error:
            return error
        return None

    groups, after_option = [], False
    for arg in argv:
        if after_option or arg.startswith("-"):
            after_option = not after_option and arg in VALUE_OPTIONS
            continue
        if groups and "=" not in arg and refusal(arg):
            groups[-1].append(arg)
        else:
            groups.append([arg])
    for group in groups:
        override = " ".join(group)
        error = refusal(override)
        if error is not None:
            reason = _reason(error)
        elif len(group) > 1:  # whole, it would do: Hydra refuses the first piece after the split
            reason = f"{group[1]!r}: {_reason(refusal(group[1]))}"
        else:
            continue
        if len(group) > 1:
            reason = f"the shell split it into {len(group)} arguments at its spaces; {reason}"
        if "=" not in override:
            print(f"error: {override} is not valid Hydra override syntax ({reason}); an override is key=value.",
                  file=sys.stderr)
        else:
            key, value = override.split("=", 1)
            quoted = f"{key}={_quoted(value)}"
            advice = f"quote the value: {shlex.quote(quoted)}" if not refusal(quoted) else "quote the value"
            print(f"error: {override} is not valid Hydra override syntax ({reason}); {advice}", file=sys.stderr)
        sys.exit(1)


def _reason(error) -> str:
    """Hydra's reason on one line: its message without the lines around it."""
    lines = str(error).splitlines()
    prefix = "LexerNoViableAltException: "
    if lines[0].startswith(prefix) and len(lines) > 1 and "^" in lines[1]:  # a caret under the character
        at = lines[1].index("^") - len(prefix)
        return f"no token can start at {error.override[at:at + 1]!r}, column {at + 1}"
    if lines[0].startswith("Error parsing override") and len(lines) > 1:
        return lines[1]
    return lines[0]


def _quoted(value: str) -> str:
    """A value in Hydra's quotes; in a list, each item that needs them."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        return "[" + ",".join(_quoted(item) for item in value[1:-1].split(",")) + "]"
    if value[:1] in ("'", '"') or all(c.isalnum() or c in "/._-+:*" for c in value):
        return value
    return f"'{value}'" if '"' in value else f'"{value}"'


if __name__ == "__main__":
    if os.environ.get("HYDRA_FULL_ERROR") != "1":  # else Hydra's own error, with its whole traceback
        check_overrides(sys.argv[1:])
    main()
