"""The training loop's own settings are checked before any work, naming the key."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from pixelgen.config import ConfigError
from pixelgen.trainer import train


@pytest.mark.parametrize('override,message', [
    ('--config.log_every_steps=0', r'log_every_steps=0 must be at least 1'),
    ('--config.checkpoint_every_steps=0', r'checkpoint_every_steps=0 must be at least 1'),
    ('--config.grad_accum_steps=0', r'grad_accum_steps=0 must be at least 1'),
    ('--config.concurrent_microbatches=0', r'concurrent_microbatches=0 must be at least 1'),
    ('--config.keep_checkpoints=0', r'keep_checkpoints=0 must be at least 1'),
    ('--config.eval_every_steps=-1', r'eval_every_steps=-1 must be 0 \(off\) or positive'),
])
def test_bad_loop_settings_fail_before_any_work(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config('', override), str(tmp_path / 'w'))
    assert not (tmp_path / 'w').exists()
