"""Configs: load `configs/<name>.py[:arg]`, apply `--config.a.b=value` overrides, save.

A config file is a plain Python module with `get_config(arg=None) -> ConfigDict` (big_vision
style). The command line picks it with `--config path.py[:arg]` and overrides any field with
`--config.model.num_layers=2`. Unknown or misspelled keys fail at once, naming the key and
the closest valid ones, before anything is compiled.

Every shipped config reads its arg with `parse_arg`, one grammar for all of them: an optional
bare first word (the variant: `tiny`, a size such as `s` or `b16`) and then `key=value`
options, comma-separated: `configs/igpt.py:l,res=48`, `configs/vit_shapes.py:tiny,label=color`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from pixelgen import storage

ConfigDict = ml_collections.ConfigDict

REQUIRED_KEYS = (
    'task', 'total_steps', 'batch_size', 'seed', 'checkpoint_every_steps', 'log_every_steps',
    'sample_every_steps', 'model', 'data', 'optimizer',
)
# What every saved config.json holds: the required keys and the mesh that loading needs.
SAVED_KEYS = REQUIRED_KEYS + ('mesh', 'sharding_rules')
CONFIG_FILE = 'config.json'

# config.json carries `config_version`. Each version lists, per task, the keys it added and
# the value that reproduces what runs saved before it did; `load_saved_config` fills them in,
# so an older workdir loads, resumes and evaluates as it was trained.
CONFIG_VERSION = 5
ADDED_KEYS: dict[int, dict[str, dict[str, Any]]] = {
    2: {'dalle': {'model.conv_wraparound': False, 'loss.caption_dropout': 0.0},
        'dvae': {'data.holdout_phrases': ()},
        'clip': {'data.holdout_phrases': ()}},
    3: {'dalle': {'init_from': '', 'init_from_step': -1},
        'dvae': {'optimizer.ema_decay': 0.0}},
    # Version 4: every task's config defines every key it reads (pixelgen/tasks/defaults.py
    # and each task's base_config), and declares the eval job's evaluators (`evals`); these
    # are the values that older files implied.
    4: {'igpt': {'objective': 'ar', 'model.num_classes': 0, 'model.scan_layers': False,
                 'classifier_loss_weight': 1.0, 'init_from': '', 'init_from_step': -1,
                 'optimizer.ema_decay': 0.0, 'evals': {'loss': {}, 'probe': {}, 'samples': {}}},
        'dalle': {'dvae_workdir': '', 'optimizer.ema_decay': 0.0, 'evals': {}},
        'dvae': {'init_from': '', 'init_from_step': -1, 'loss.straight_through': False,
                 'loss.code_entropy_weight': 0.0, 'loss.diversity_weight': 0.0,
                 'loss.laplace_scale': 0.0, 'loss.likelihood': 'logit_laplace',
                 'loss.gaussian_scale': 0.0, 'evals': {'reconstruction': {}}},
        'clip': {'init_from': '', 'init_from_step': -1, 'optimizer.ema_decay': 0.0,
                 'evals': {'zeroshot': {}, 'retrieval': {}}},
        'vit': {'optimizer.ema_decay': 0.0, 'evals': {'accuracy': {}}}},
    # Version 5: config.runtime (the CPU paths the environment variables chose before) and
    # DALL·E's tokenizer sample (older runs trained their BPE on every caption).
    5: {task: {'runtime': {'native_attention': True, 'cpu_decode': 'cores'},
               **({'data.tokenizer_captions': 0} if task == 'dalle' else {})}
        for task in ('igpt', 'dalle', 'dvae', 'clip', 'vit')},
}


class UserError(Exception):
    """A problem with what the user gave (a flag, a config, a file) that they can fix.

    Every `python -m pixelgen.<job>` entry point prints its message as one `error: ...` line
    and exits with code 2, without a traceback (`pixelgen.cli.run`); so the message names the
    file, key or value and says what to do. Any other exception is a bug and keeps its
    traceback.
    """


class ConfigError(UserError, ValueError):
    """A config or command-line problem that the user can fix; the message says how."""


def parse_arg(arg: str | None, **spec: Any) -> ConfigDict:
    """A config file's `arg` as a ConfigDict with one field per `spec` key (big_vision's
    `parse_arg`, plus a bare variant word): `parse_arg('l,res=48', size=('s', 'm', 'l'),
    res=0)` is {size: 'l', res: 48}. A spec value is the default, whose type (int, float,
    bool or str) the given text is converted to, or a tuple of the allowed strings, whose
    first is the default. The first spec key also takes a bare first word; every other item
    is `key=value`. An unknown key, a value not allowed, a second bare word or a value of the
    wrong type is a ValueError naming what is allowed."""
    values = {k: v[0] if isinstance(v, tuple) else v for k, v in spec.items()}
    names = list(spec)
    items = [item.strip() for item in (arg or '').split(',') if item.strip()]
    if items and not names:
        raise ValueError(f'this config takes no arg (got {arg!r}); override fields with '
                         '--config.<key>=<value>.')
    for index, item in enumerate(items):
        key, sep, text = item.partition('=')
        if not sep:
            if index or not names:
                raise ValueError(f'{item!r} in {arg!r}: only the first item may be a bare '
                                 f'variant; write key=value (keys: {", ".join(names)}).')
            key, text = names[0], item
        key = key.strip()
        if key not in values:
            raise ValueError(f'unknown option {key!r} in {arg!r}; this config takes '
                             f'{", ".join(f"{k}=" for k in names) or "no options"}.')
        values[key] = _typed(key, text.strip(), spec[key])
    return ConfigDict(values)


def _typed(key: str, text: str, default: Any) -> Any:
    if isinstance(default, tuple):
        if text not in default:
            raise ValueError(f'unknown {key} {text!r}; expected one of '
                             f'{", ".join(map(repr, default))}.')
        return text
    if isinstance(default, bool):
        if text.lower() not in ('true', 'false'):
            raise ValueError(f'{key}={text}: expected true or false.')
        return text.lower() == 'true'
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f'{key}={text}: expected a{"n" if kind is int else ""} '
                                 f'{kind.__name__}.') from None
    return text


def load_config_file(spec: str) -> ConfigDict:
    """Loads `path.py` or `path.py:arg` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        path = _shipped_config(path) or path
    if not os.path.isfile(path):
        raise ConfigError(f'Config file {path!r} does not exist. Pass --config configs/<name>.py '
                          f'(available: {", ".join(sorted(_available_configs()))}).')
    module_spec = importlib.util.spec_from_file_location('pixelgen_user_config', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f'{path}, line {e.lineno}: {e.msg}: {(e.text or "").strip()!r}. Fix '
                          'the config file.') from e
    if not hasattr(module, 'get_config'):
        raise ConfigError(f'Config file {path!r} has no get_config(arg=None) function.')
    try:
        config = module.get_config(arg or None)
    except (ValueError, KeyError) as e:  # the config's own refusal, e.g. of an unknown variant
        raise ConfigError(f'--config {spec}: {e}') from e
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f'Config {spec!r} lacks the required keys {missing}.')
    return config


SHIPPED_CONFIGS = os.path.join(os.path.dirname(__file__), 'configs')  # the package pixelgen.configs


def _shipped_config(path: str) -> str | None:
    """`configs/<name>.py` (or `<name>.py`) among the configs installed with pixelgen, for a
    path that does not exist from here (e.g. after a non-editable install)."""
    name = path.removeprefix('configs/').removeprefix('./configs/')
    candidate = os.path.join(SHIPPED_CONFIGS, name)
    return candidate if os.sep not in name and os.path.isfile(candidate) else None


def _available_configs() -> list[str]:
    if not os.path.isdir(SHIPPED_CONFIGS):
        return []
    return [f'configs/{f}' for f in os.listdir(SHIPPED_CONFIGS)
            if f.endswith('.py') and f != '__init__.py']


def _parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, '(1, 2)' -> (1, 2), 'abc' -> 'abc'."""
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    if text.lower() in ('none', 'null'):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _all_keys(config: ConfigDict, prefix: str = '') -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ConfigDict):
            keys.extend(_all_keys(value, prefix + key + '.'))
    return keys


def _unknown_key_error(config: ConfigDict, dotted: str) -> ConfigError:
    candidates = _all_keys(config)
    close = difflib.get_close_matches(dotted, candidates, n=3, cutoff=0.6)
    leaf_close = [k for k in candidates if k.rsplit('.', 1)[-1] in difflib.get_close_matches(
        dotted.rsplit('.', 1)[-1], [c.rsplit('.', 1)[-1] for c in candidates], n=3, cutoff=0.75)]
    suggestions = list(dict.fromkeys(close + leaf_close))[:3]
    hint = f' Did you mean {" or ".join(suggestions)}?' if suggestions else ''
    return ConfigError(f'Unknown config key {dotted!r}.{hint} '
                       f'Run with --help_config to list every key.')


def apply_override(config: ConfigDict, dotted: str, text: str) -> None:
    """Sets config.<dotted> from its command-line text, keeping the field's type."""
    *parents, leaf = dotted.split('.')
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ConfigDict):
            raise _unknown_key_error(config, dotted)
        node = node[part]
    if leaf not in node:
        raise _unknown_key_error(config, dotted)
    value = _parse_value(text)
    old = node[leaf]
    if isinstance(old, str) and not isinstance(value, str):
        value = text  # '--config.model.remat=none' and '--config.data.dataset=123' are strings
    if value is None and old is not None:
        raise ConfigError(f'--config.{dotted}={text}: {dotted} cannot be None; pass a '
                          f'{type(old).__name__} (the default is {old!r}).')
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        with node.unlocked():
            node[leaf] = value
    except TypeError as e:
        raise ConfigError(f'--config.{dotted}={text}: expected a value of type '
                          f'{type(old).__name__} (the default is {old!r}).') from e


def parse_config_args(argv: Sequence[str]) -> tuple[ConfigDict, list[str]]:
    """Splits argv into a config (file + overrides, applied in order) and the other arguments."""
    spec, overrides, rest = None, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == '--config' or arg.startswith('--config='):
            spec = arg.split('=', 1)[1] if '=' in arg else (args.pop(0) if args else None)
        elif arg.startswith('--config.'):
            key, eq, value = arg[len('--config.'):].partition('=')
            if not eq:
                if not args:
                    raise ConfigError(f'{arg} needs a value, e.g. {arg}=8.')
                value = args.pop(0)
            overrides.append((key, value))
        else:
            rest.append(arg)
    if spec is None:
        raise ConfigError('No --config given. Pass e.g. --config configs/igpt_shapes.py '
                          f'(available: {", ".join(sorted(_available_configs()))}).')
    config = load_config_file(spec)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config, rest


def save_config(config: ConfigDict, workdir: str) -> str:
    """Writes the resolved config as `<workdir>/config.json` (a local path or a URL) whole or
    not at all; returns its path."""
    tree = json.loads(config.to_json())
    tree['config_version'] = CONFIG_VERSION
    return storage.write_text(storage.join(workdir, CONFIG_FILE),
                              json.dumps(tree, indent=2, sort_keys=True))


def load_saved_config(workdir: str) -> ConfigDict:
    """Reads the resolved config that a training run (or `convert`) wrote into its workdir;
    a damaged or incomplete file is a ConfigError naming it."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.is_file(path):
        raise ConfigError(f'{path} not found: {workdir!r} is not a pixelgen workdir '
                          '(train into it first with python -m pixelgen.train).')
    fix = ('Restore it from a copy of the workdir: it is the resolved config the checkpoints '
           'were trained with.')
    try:
        tree = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f'{path} is not valid JSON (line {e.lineno}, column {e.colno}: '
                          f'{e.msg}); it is truncated or damaged. {fix}') from e
    missing = [k for k in SAVED_KEYS if not isinstance(tree, dict) or k not in tree]
    missing += [f'{k}.*' for k in ('model', 'data', 'optimizer')
                if isinstance(tree, dict) and k in tree and not isinstance(tree[k], dict)]
    if missing:
        raise ConfigError(f'{path} is incomplete: it lacks {", ".join(missing)}. {fix}')
    config = ConfigDict(_tuples(upgrade(tree, path)))
    config.lock()
    return config


def upgrade(tree: dict, path: str = CONFIG_FILE) -> dict:
    """A saved config tree brought to CONFIG_VERSION: the keys added since its version
    (`ADDED_KEYS`) with the values that reproduce it. Files without `config_version` are
    version 1."""
    tree = dict(tree)
    version = tree.pop('config_version', 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise ConfigError(f'{path}: config_version {version!r} is not one this pixelgen reads '
                          f'(1..{CONFIG_VERSION}); a newer pixelgen wrote it: upgrade pixelgen.')
    for added in range(version + 1, CONFIG_VERSION + 1):
        for dotted, value in ADDED_KEYS[added].get(tree.get('task'), {}).items():
            node = tree
            *parents, leaf = dotted.split('.')
            for name in parents:
                node = node.setdefault(name, {})
            node.setdefault(leaf, copy.deepcopy(value))
    return tree


def _tuples(tree):
    """JSON has no tuples; configs use them for shapes and mesh axes."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def format_config(config: ConfigDict) -> str:
    return '\n'.join(f'  {k} = {v!r}' for k, v in _flat(config))


def _flat(config: ConfigDict, prefix: str = ''):
    for key, value in sorted(config.items()):
        if isinstance(value, ConfigDict):
            yield from _flat(value, prefix + key + '.')
        else:
            yield prefix + key, value


CONFIG_EPILOG = ('--config FILE[:variant] picks the config; --config.a.b=value overrides a '
                 'field; --help_config lists every field.')


def parse_job_args(argv: list[str], prog: str, description: str,
                   add_arguments) -> tuple[ConfigDict, argparse.Namespace] | None:
    """The start of every job that takes a config (train, aot): None after printing the help
    that was asked for (--help_config: every field of the config with its value; -h: the
    job's flags), else (the config of --config and its --config.* overrides, the job's other
    flags). `add_arguments(parser)` declares those flags."""
    if '--help_config' in argv:
        config, _ = parse_config_args([a for a in argv if a != '--help_config'])
        print(format_config(config))
        return None
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=CONFIG_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    if any(a in ('-h', '--help') for a in argv):
        parser.print_help()
        return None
    config, rest = parse_config_args(argv)
    return config, parser.parse_args(rest)
