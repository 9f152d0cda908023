"""Training: the loop behind `fastsft train`, its config, checkpoints, metrics and the built-in default job.

from fastsft.train import load_config, train
result = train(load_config("job.yaml", ["optimizer.lr=1e-5"]))   # exactly what `fastsft train job.yaml ...` runs
result.run_dir, result.losses, result.eval_loss, result.exact_match_after
"""

from .config import ConfigError, TrainConfig, load_config


def train(config: TrainConfig, **kwargs):
    """Run `config` to the end (see fastsft.train.loop.train); imported on use, so the config stays light."""
    from .loop import train as run

    return run(config, **kwargs)


__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]
