"""FlexibleArgumentParser: the argparse parser vLLM's example programs build their flags with.

As vLLM's: a long flag may be written with underscores or dashes (`--max_model_len` is
`--max-model-len`), and `--config FILE.yaml` reads flags from a YAML mapping, which the
command line overrides.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


class FlexibleArgumentParser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if "--config" in args or any(a.startswith("--config=") for a in args):
            args = self._with_config_file(args)
        return super().parse_known_args([_dashed(a) for a in args], namespace)

    def _with_config_file(self, args: list[str]) -> list[str]:
        """The YAML file's flags first, so that the command line's own come later and win."""
        i = next(i for i, a in enumerate(args) if a == "--config" or a.startswith("--config="))
        if args[i] == "--config":
            if i + 1 >= len(args):
                self.error("argument --config: expected a YAML file")
            path, rest = args[i + 1], args[:i] + args[i + 2 :]
        else:
            path, rest = args[i].split("=", 1)[1], args[:i] + args[i + 1 :]
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            self.error(f"argument --config: {path} must hold a mapping of flag names to values")
        from_file: list[str] = []
        for key, value in config.items():
            flag = "--" + str(key).replace("_", "-")
            if value is True:
                from_file.append(flag)
            elif value is False:
                from_file.append("--no-" + flag[2:])
            elif isinstance(value, list):
                from_file += [flag, *map(str, value)]
            elif isinstance(value, dict):
                from_file += [flag, json.dumps(value)]
            else:
                from_file += [flag, str(value)]
        # Leading positionals (`jllm serve MODEL`) stay first.
        num_head = next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))
        return rest[:num_head] + from_file + rest[num_head:]


def _dashed(arg: str) -> str:
    """`--foo_bar` and `--foo_bar=v` as `--foo-bar`; values and short flags unchanged."""
    if not arg.startswith("--"):
        return arg
    key, eq, value = arg.partition("=")
    return key.replace("_", "-") + eq + value
